"""Page copies between the tiers, run between steps.

    phase      when                         what
    start      after schedule, before run   page files written (disk_writes.py),
                                            device -> host gather + async copy (swap-out),
                                            device -> device (copy on write),
                                            host -> device staged (swap-in starts; "next_step")
                                            or handed to this step ("layered")
    run        the step                     "layered": each layer's pages are written just
                                            before that layer runs, the next layer's copy
                                            overlapping it (model.Llama, incoming)
    land       at the start of next step    "next_step": staged swap-ins scattered into pools
    flush      no step to carry them        "layered": written into the pools at once

"next_step": a swap-in overlaps one whole step's compute and its turn runs from the next step
on. "layered": its turn runs in the same step, and the copy overlaps that step's layers.
Pages read from disk (by the restore plan, while the step before runs) join the host pages of
the same swap-in: one staged copy for both.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.kvcache.disk_cache import DiskCache
from pensieve_jax.kvcache.disk_writes import DiskWrites
from pensieve_jax.kvcache.host_cache import HostCache
from pensieve_jax.runner.model_runner import HostPages, ModelRunner
from pensieve_jax.kvcache.transfer_costs import TransferCosts


class Swapper:
    def __init__(self, runner: ModelRunner, store: ConversationStore, host: HostCache,
                 rates: TransferCosts, layered: bool = False, disk: DiskCache | None = None):
        self.runner, self.store, self.host, self.rates = runner, store, host, rates
        self.layered = layered
        self.disk = disk if disk is not None and disk.enabled else None
        self.disk_writes = DiskWrites(runner, store, host, self.disk) if self.disk else None
        self._landing = None                 # swap-ins started, to land at the next step
        self._incoming: HostPages | None = None    # "layered": for the step about to run

    @property
    def in_flight(self) -> bool:
        """Swap-ins started that have not landed yet."""
        return self._landing is not None

    def start(self) -> None:
        """Run the copies the scheduler planned: device -> host, device -> device, then host ->
        device (a page freed by one may be the target of a later one)."""
        self.host.finish_writes()           # last step's device -> host copies land now
        if self.disk_writes is not None:
            self.disk_writes.start()        # reads host pages (and gathers device pages) first
        out, copies, into = self.store.take_transfers()
        from_disk = self.store.restorer.take_disk_loads()
        if out:
            self.host.write_async(self.runner.gather_pages([d for d, _ in out]),
                                  [h for _, h in out])
        if copies:
            self.runner.copy_pages(copies)
        if into or from_disk:
            start = time.perf_counter()
            k, v = self._read(into, from_disk)
            host_pages = [s.host_page for s in into]
            into = [*into, *from_disk]
            if self.layered:
                self._incoming = HostPages(k, v, [s.device_page for s in into])
                self.host.stats["in_layered_pages"] += len(into)
            else:
                self._landing = (self.runner.stage_pages(k, v), into)
            self.store.swapped_in(host_pages)
            self.host.stats["in_s"] += time.perf_counter() - start

    def _read(self, into, from_disk) -> tuple:
        """k, v [layers, n, ...] of the host pages of `into`, then the pages read from disk."""
        ks, vs = [], []
        if into:
            k, v = self.host.read([s.host_page for s in into])
            ks.append(k)
            vs.append(v)
        if from_disk:
            ks.append(np.stack([d.k for d in from_disk], axis=1))
            vs.append(np.stack([d.v for d in from_disk], axis=1))
        if len(ks) == 1:
            return ks[0], vs[0]
        return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)

    def flush_to_disk(self, conversation_ids: list[str] | None = None,
                      deadline: float | None = None) -> int:
        """Write a copy of the device and host pages of idle conversations (or the ones named,
        in that order) to page files a later process can claim (ConversationStore.reopen),
        none started after deadline (time.monotonic()); see DiskWrites.flush_to_disk. Run on
        the engine thread with no step in flight (after StepLoop.settle_copies). Returns the
        pages written (0 without a disk tier)."""
        if self.disk_writes is None:
            return 0
        self.start()                        # queued swap-outs: gathered and copied to host
        self.flush()
        self.host.finish_writes()
        return self.disk_writes.flush_to_disk(conversation_ids, deadline)

    def take_incoming(self) -> HostPages | None:
        """"layered": the swap-ins the step about to run must load (it then owns them)."""
        incoming, self._incoming = self._incoming, None
        return incoming

    def flush(self) -> None:
        """"layered" swap-ins that no step will carry: into the pools now."""
        if self._incoming is not None:
            self.runner.scatter_pages(*self.take_incoming())

    def land(self) -> bool:
        """Scatter the started swap-ins into the pools (pages whose conversation let them go
        meanwhile are skipped). True if there were any."""
        if self._landing is None:
            return False
        staged, into = self._landing
        self._landing = None
        hidden = all(a.is_ready() for a in jax.tree.leaves(staged))
        start = time.perf_counter()
        jax.block_until_ready(staged)
        self.host.stats["in_wait_s"] += time.perf_counter() - start
        self.host.stats["in_hidden_pages"] += len(into) if hidden else 0
        self.runner.scatter_staged(staged, [
            s.device_page if s.index < len(s.conversation.pages) and
            s.conversation.pages[s.index] == s.device_page else -1 for s in into])
        return True

    def drop(self) -> None:
        """Forget staged swap-ins and gathered pages (their pools are gone after a failed
        step)."""
        self._landing = self._incoming = None
        if self.disk_writes is not None:
            self.disk_writes.drop()

    def report_stats(self) -> dict[str, dict]:
        """A Reporter (model/reporting.py): swap, the host tier's copies (HostCache.stats),
        the transfer rates (TransferCosts.stats) and why steps cannot load host pages inside
        (None: they can); disk, the disk tier's counters and bytes (DiskCache.report;
        {"enabled": False} without one)."""
        return {"swap": dict(self.host.stats, **self.rates.stats(),
                             in_step_load_error=self.runner.in_step_load_error),
                "disk": self.disk.report() if self.disk is not None else {"enabled": False}}
