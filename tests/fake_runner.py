"""A runner without a device or a model (runner/seam.py's protocol), for testing the real
engine, scheduler and KV cache fast.

Its KV pools have the real layout, [layers, num_pages, page_size, kv_heads, head_dim]; a
step writes, for each new token, its id + 1 into k and its position + 1 into v (every layer,
head and dim), then reads each sequence's whole context back through its page table, checks
that slot j holds position j, and "samples" a function of the context's token ids (`next_token`,
the same function `reference` applies from scratch). So a cache that lost, moved or mixed up a
page gives other tokens than recomputing from scratch, or fails the step loudly, as the model
would not. Page copies between tiers move these contents like the real page programs do.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from pensieve_jax.runner.page_programs import PAGE_CHUNK
from pensieve_jax.runner.programs import ProgramSet, StepShape, token_buckets
from pensieve_jax.runner.step_program import HostPages, StepHandle, StepInput


def next_token(context: list[int], vocab: int) -> int:
    """The fake model: the next token of a context (a hash of all of it)."""
    h = 17
    for t in context:
        h = (h * 1000003 + t + 1) % (1 << 61)
    return (h >> 13) % vocab


def reference(prompt: list[int], max_tokens: int, vocab: int,
              stop_token_ids: tuple[int, ...] = ()) -> list[int]:
    """The tokens a greedy turn must produce, computed from scratch."""
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        token = next_token(seq, vocab)
        out.append(token)
        seq.append(token)
        if token in stop_token_ids:
            break
    return out


class FakeRunner:
    def __init__(self, model_config, num_pages: int, page_size: int, max_num_seqs: int = 8,
                 max_batched_tokens: int = 64, max_model_len: int = 256,
                 token_ladder: tuple[int, ...] | None = None):
        c = model_config
        self.vocab = c.vocab_size
        self.num_pages, self.page_size = num_pages, page_size
        self.dtype = np.dtype(np.float32)
        self.programs = ProgramSet(tuple(token_ladder or token_buckets(max_batched_tokens)),
                                   max_num_seqs, -(-max_model_len // page_size))
        self.shape = (c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim)
        self.params: Any = {}
        self.kv: Any = None
        self.reset_kv()
        self.steps = 0
        self.compiled = False

    # -- the protocol -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.compiled

    @property
    def in_step_load_error(self) -> str | None:
        return None

    def precompile(self, progress: Callable[[StepShape, float], None] | None = None) -> None:
        for shape in self.programs.shapes:
            if progress is not None:
                progress(shape, 0.0)
        self.compiled = True

    def reset_kv(self) -> None:
        self.kv = (np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32))

    def report_stats(self) -> dict[str, dict[str, Any]]:
        return {"programs": {
            "count": len(self.programs.shapes), "shapes": [], "page_chunk": PAGE_CHUNK,
            "compiled": len(self.programs.shapes) if self.compiled else 0, "compile_s": 0.0,
            "ready": self.ready, "step_programs_after_ready": 0, "real_tokens": 0,
            "padded_tokens": 0, "cpu_kernels": "off: no device"}}

    def step(self, s: StepInput, incoming: HostPages | None = None) -> np.ndarray:
        return self.fetch(self.dispatch(s, incoming))

    def fetch(self, handle: StepHandle) -> np.ndarray:
        return np.asarray(handle.tokens)[:handle.num_seqs]

    def dispatch(self, s: StepInput, incoming: HostPages | None = None,
                 last: StepHandle | None = None, token_src: np.ndarray | None = None
                 ) -> StepHandle:
        self.programs.shape_for(len(s.token_ids))     # the step fits a program
        if incoming is not None:
            self.scatter_pages(*incoming)
        ids = np.asarray(s.token_ids, np.int64).copy()
        if token_src is not None:
            fed = np.asarray(token_src) >= 0
            assert last is not None, "token_src without the step it reads"
            ids[fed] = np.asarray(last.tokens)[np.asarray(token_src)[fed]]
        k, v = self.kv
        ps = self.page_size
        for t, (tok, pos) in enumerate(zip(ids, s.positions)):
            seq = int(np.searchsorted(s.cu_q_lens[1:], t, side="right"))
            page = s.page_table[seq][pos // ps]
            k[:, page, pos % ps] = tok + 1
            v[:, page, pos % ps] = pos + 1
        tokens = np.zeros(self.programs.max_num_seqs, np.int32)
        for i, kv_len in enumerate(s.kv_lens):
            context = []
            for pos in range(int(kv_len)):
                page = s.page_table[i][pos // ps]
                stored = int(v[0, page, pos % ps, 0, 0]) - 1
                if stored != pos:
                    raise AssertionError(f"sequence {i}: slot of position {pos} (page {page}) "
                                         f"holds position {stored}")
                context.append(int(k[0, page, pos % ps, 0, 0]) - 1)
            tokens[i] = next_token(context, self.vocab)
        self.steps += 1
        return StepHandle(tokens, len(s.kv_lens))

    # -- page copies --------------------------------------------------------------------------

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        k, v = self.kv
        src = [s for s, _ in pairs]
        dk, dv = k[:, src].copy(), v[:, src].copy()       # every source before any write
        for i, (_, d) in enumerate(pairs):
            k[:, d], v[:, d] = dk[:, i], dv[:, i]

    def gather_pages(self, page_ids: list[int]) -> list[tuple[jax.Array, jax.Array]]:
        k, v = self.kv
        out = []
        for i in range(0, len(page_ids), PAGE_CHUNK):
            ids = list(page_ids[i:i + PAGE_CHUNK])
            ids += [0] * (PAGE_CHUNK - len(ids))
            # device arrays, as the real gather's (the host tier copies them asynchronously)
            out.append((jax.device_put(k[:, ids]), jax.device_put(v[:, ids])))
        return out

    def gather_pages_host(self, page_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        k, v = self.kv
        return k[:, list(page_ids)].copy(), v[:, list(page_ids)].copy()

    def scatter_pages(self, k: np.ndarray, v: np.ndarray, page_ids: list[int]) -> None:
        self.scatter_staged(self.stage_pages(k, v), page_ids)

    def stage_pages(self, k: np.ndarray, v: np.ndarray) -> list[tuple[jax.Array, jax.Array]]:
        return [(jax.device_put(k[:, i:i + PAGE_CHUNK]), jax.device_put(v[:, i:i + PAGE_CHUNK]))
                for i in range(0, k.shape[1], PAGE_CHUNK)]

    def scatter_staged(self, staged: list[tuple[np.ndarray, np.ndarray]],
                       page_ids: list[int]) -> None:
        k, v = self.kv
        for c, (ck, cv) in enumerate(staged):
            ck, cv = np.asarray(ck), np.asarray(cv)
            for j, page in enumerate(page_ids[c * PAGE_CHUNK:(c + 1) * PAGE_CHUNK]):
                if page >= 0:
                    k[:, page], v[:, page] = ck[:, j], cv[:, j]
