"""A step's rows as the runner takes them: dense host arrays (runner StepInput)."""

from __future__ import annotations

import numpy as np

from pensieve_jax.runner.step_program import StepInput


def step_input(rows, page_size: int) -> StepInput:
    """Dense step arrays for scheduled rows (scheduler.Row: request, start, end)."""
    # Each row's table holds the pages up to its kv_len only (pages a conversation keeps past
    # it are neither read nor written), so the width, and every sequence's attention context,
    # follows the longest kv_len of the step.
    needed = [-(-r.end // page_size) for r in rows]
    table = np.zeros((len(rows), max(needed)), np.int32)
    for i, (r, n) in enumerate(zip(rows, needed)):
        pages = r.request.conversation.pages
        if n > len(pages) or min(pages[:n], default=0) < 0:
            raise RuntimeError(f"scheduler bug: row {r.start}:{r.end} of conversation "
                               f"{r.request.conversation.id} lacks device pages ({pages})")
        table[i, :n] = pages[:n]
    reqs = [r.request for r in rows]
    p = [r.params for r in reqs]
    return StepInput(
        token_ids=np.concatenate([r.request.token_ids[r.start:r.end] for r in rows]).astype(
            np.int32),
        positions=np.concatenate([np.arange(r.start, r.end) for r in rows]).astype(np.int32),
        page_table=table, kv_lens=np.asarray([r.end for r in rows], np.int32),
        cu_q_lens=np.cumsum([0] + [r.end - r.start for r in rows]).astype(np.int32),
        temperature=np.asarray([x.temperature for x in p], np.float32),
        top_k=np.asarray([x.top_k for x in p], np.int32),
        top_p=np.asarray([x.top_p for x in p], np.float32),
        seeds=np.asarray([r.seed for r in reqs], np.uint32),
        counters=np.asarray([len(r.output) for r in reqs], np.int32))
