"""The router's choice when it moves a conversation: load its KV from another replica, or
recompute it, whichever the measured speeds say is faster."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


class MoveChoice(NamedTuple):
    transfer: bool
    tokens: int              # tokens the target lacks
    bytes: int               # their KV
    transfer_s: float        # estimated: bytes / bandwidth + per-call overhead
    recompute_s: float       # estimated: tokens / prefill speed


@dataclasses.dataclass
class CostModel:
    """Transfer vs recompute, from measured speeds: moving bytes costs bytes / bandwidth (plus a
    per-transfer overhead), recomputing costs tokens / prefill speed. Estimates are running
    averages (EWMA) of what transfers and turns measured; the start values are guesses."""
    bandwidth_bps: float = 1e9       # bytes/s of KV moved replica to replica
    overhead_s: float = 0.005        # fixed cost of one transfer (calls, gather, scatter)
    prefill_tps: float = 5000.0      # prompt tokens/s a replica computes
    alpha: float = 0.3               # weight of a new measurement
    samples: dict = dataclasses.field(default_factory=lambda: {"transfers": 0, "prefills": 0})

    def choose(self, tokens: int, nbytes: int) -> MoveChoice:
        t = self.overhead_s + nbytes / self.bandwidth_bps
        r = tokens / self.prefill_tps
        return MoveChoice(tokens > 0 and t < r, tokens, nbytes, t, r)

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        """One transfer's bytes and wall time: small ones teach the overhead, large ones the
        bandwidth (over the time left after the overhead)."""
        if seconds <= 0:
            return
        self.samples["transfers"] += 1
        a = self.alpha
        if nbytes < 256 << 10:
            self.overhead_s = (1 - a) * self.overhead_s + a * seconds
        else:
            bw = nbytes / max(seconds - self.overhead_s, seconds / 2)
            self.bandwidth_bps = (1 - a) * self.bandwidth_bps + a * bw

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A turn's computed prompt tokens and its time to first token."""
        if tokens >= 16 and seconds > 0:
            self.samples["prefills"] += 1
            self.prefill_tps = (1 - self.alpha) * self.prefill_tps + self.alpha * tokens / seconds

    def as_dict(self) -> dict:
        return {"bandwidth_bps": self.bandwidth_bps, "overhead_s": self.overhead_s,
                "prefill_tps": self.prefill_tps, "samples": dict(self.samples)}
