"""The step programs an engine configuration runs: a token ladder and the fixed shapes over it,
known before the first request (ModelRunner compiles them all in `precompile`)."""

from __future__ import annotations

import dataclasses

INCOMING_PAGES = 64   # pages a "layered" step loads inside it (more: the rest just before it)


def token_buckets(max_tokens: int, minimum: int = 8, single: bool = False) -> tuple[int, ...]:
    """The token ladder: powers of two from `minimum`, with midpoints 1.5x between 32 and 128
    (where decode batches with a short turn beside them land, and a chat turn's own prefill)
    and 1.25x after 64 (a chat turn of 65-80 new tokens: SmolLM2 on a 2-core CPU ran a
    72-token turn over 728 cached in 225-252 ms at 80 rows, 275-285 ms padded to 96), capped
    by and ending at max_tokens. 512 -> 8 16 32 48 64 80 96 128 256 512 (10 programs; each
    more costs about 3 s of cold start for SmolLM2 on a 2-core CPU). single: 1 first too, for
    one sequence's decode alone (the engine's choice on CPU, `single_decode_program`: there
    its matmuls become matrix-vector products, a third faster than the row padded to 8)."""
    ladder, size = [1] if single else [], max(1, minimum)
    while size < max_tokens:
        ladder.append(size)
        if 32 <= size < 128 and size * 3 // 2 < max_tokens:
            ladder.append(size * 3 // 2)
        if size == 64 and size * 5 // 4 < max_tokens:
            ladder.append(size * 5 // 4)
        size *= 2
    ladder.append(max_tokens)
    return tuple(sorted(set(ladder)))


def single_decode_program(platform: str) -> bool:
    """Whether the ladder starts with a 1-token program on `platform`: on CPU a batch-1 decode
    step ran in 30 ms instead of 47 ms padded to 8 rows (SmolLM2 f32, context 512, 2 cores, same
    process); a GPU's step is not bound by that."""
    return platform == "cpu"


@dataclasses.dataclass(frozen=True)
class StepShape:
    """One compiled step program."""

    tokens: int              # T: token rows (real ones first, then padding)
    seqs: int                # S: page-table rows, min(T, max_num_seqs)
    pages_per_seq: int       # P: page-table width, pages of max_model_len
    incoming_pages: int = 0  # pages loaded layer by layer during the step (0: none)
    slots: int = 0           # the sampled tokens' width, max_num_seqs for every program of a
                             # set (0: seqs), so one step's output feeds the next (last_tokens)


@dataclasses.dataclass(frozen=True)
class ProgramSet:
    """Every step program an engine configuration can run, known before the first request.

    How it is derived (a comment table; T runs over `token_buckets(max_batched_tokens)`):

      dimension      value                                  why it is enough
      tokens T       the ladder                             a step pads up to the next bucket
      sequences S    min(T, max_num_seqs)                   every row holds >= 1 token
      pages P        ceil(max_model_len / page_size)        no sequence is longer
      incoming       0, and INCOMING_PAGES with swap_in     more pages load before the step
                     "layered" and a host tier

    So a configuration has len(ladder) programs (twice that with layered loads). Page copies
    add three programs (gather, scatter, copy) of PAGE_CHUNK pages.
    """

    token_buckets: tuple[int, ...]
    max_num_seqs: int
    pages_per_seq: int
    incoming_pages: int = 0

    def shape_for(self, num_tokens: int, incoming: bool = False) -> StepShape:
        """The program a step of num_tokens token rows runs."""
        for t in self.token_buckets:
            if t >= num_tokens:
                return self._shape(t, incoming)
        raise ValueError(f"a step of {num_tokens} tokens exceeds the largest program "
                         f"({self.token_buckets[-1]} tokens, max_batched_tokens)")

    def _shape(self, t: int, incoming: bool) -> StepShape:
        return StepShape(t, min(t, self.max_num_seqs), self.pages_per_seq,
                         self.incoming_pages if incoming else 0, self.max_num_seqs)

    @property
    def shapes(self) -> list[StepShape]:
        loads = (False, True) if self.incoming_pages else (False,)
        return [self._shape(t, m) for m in loads for t in self.token_buckets]


def bucket(n: int, minimum: int) -> int:
    """The power of two >= n (at least minimum)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size
