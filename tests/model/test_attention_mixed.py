"""The XLA path on mixed steps (prefills of several lengths, decodes, idle rows, padding, tiles
holding rows of several sequences, page tables much wider than any context) against dense
per-sequence attention in float64; and the runner's fixed programs on such steps."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pensieve_jax.model.attention import (LAST_ROWS_KEYS, TILE_KEYS, TILE_ROWS, AttentionBatch,
                                    KVCache, xla_paged_attention)
from pensieve_jax.engine.step_input import step_input
from pensieve_jax.runner.model_runner import ModelRunner
from pensieve_jax.runner.step_program import StepInput
from pensieve_jax.weights import load_model
from tests.model.test_attention import reference

HEAD_DIM, PAGE_SIZE = 16, 8


def make_batch(rng, q_lens, kv_lens, *, kv_heads, group, num_tokens, num_seqs, width,
               num_pages=160):
    """Random pools; sequences' pages scattered over them; num_tokens - sum(q_lens) padding
    rows; num_seqs - len(q_lens) padding sequences (kv_len 0, q_len 0)."""
    assert sum(q_lens) <= num_tokens and len(q_lens) <= num_seqs
    perm = rng.permutation(num_pages)
    table = np.zeros((num_seqs, width), np.int32)
    used = 0
    for s, k in enumerate(kv_lens):
        n = -(-k // PAGE_SIZE)
        assert n <= width
        table[s, :n] = perm[used:used + n]
        table[s, n:] = rng.integers(0, num_pages, width - n)    # garbage past kv_len
        used += n
    shape = (1, num_pages, PAGE_SIZE, kv_heads, HEAD_DIM)
    kv = KVCache(rng.standard_normal(shape).astype(np.float32),
                 rng.standard_normal(shape).astype(np.float32))
    q = rng.standard_normal((num_tokens, kv_heads * group, HEAD_DIM)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    cu = np.concatenate([cu, np.full(num_seqs - len(q_lens), cu[-1])]).astype(np.int32)
    lens = np.zeros(num_seqs, np.int32)
    lens[:len(kv_lens)] = kv_lens
    return q, kv, AttentionBatch(table, lens, cu)


@functools.lru_cache(maxsize=None)
def jitted():
    return jax.jit(lambda q, kv, b: xla_paged_attention(
        q, kv, jnp.int32(0), b, sm_scale=HEAD_DIM ** -0.5))


def check(q, kv, batch):
    out = np.asarray(jitted()(jnp.asarray(q), kv, batch))
    np.testing.assert_allclose(out, reference(q, kv, batch, HEAD_DIM ** -0.5),
                               atol=2e-5, rtol=1e-5)
    assert np.all(out[batch.cu_q_lens[-1]:] == 0)               # padding rows
    assert np.all(np.isfinite(out))


CASES = {
    # one prefill chunk (several tiles, the last one partial) among decodes of other lengths
    "chunk_and_decodes": ([130, 1, 1, 1, 1, 1, 1, 1], [130, 9, 1, 200, 64, 65, 33, 150]),
    # prompts on and off tile boundaries, over history, with decodes and idle rows: tiles of
    # TILE_ROWS rows hold rows of several sequences
    "prefill_lengths": ([64, 1, 65, 0, 2, 66, 1, 0, 3], [64, 40, 200, 17, 2, 90, 1, 0, 10]),
    "short_prompts": ([2, 3, 17, 16, 15, 1, 5], [2, 300, 17, 140, 15, 129, 6]),
    "decode_only": ([1] * 9, [5, 17, 200, 1, 64, 65, 8, 9, 130]),
    "prefill_only": ([200], [210]),
    "all_idle_but_one": ([0, 0, 1, 0], [16, 3, 70, 0]),
}


# make test: every case with (wide False, group 1) and (wide True, group 3); the other two
# corners are slow (`make test-all`; .ci/run runs them)
@pytest.mark.parametrize("wide,group", [(False, 1), (True, 3),
                                        pytest.param(False, 3, marks=pytest.mark.slow),
                                        pytest.param(True, 1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_steps_match_dense_attention(rng, name, group, wide):
    """wide: the table has 64 pages per sequence (as a program's fixed width), far past any
    context; the cost and the result must not depend on it."""
    q_lens, kv_lens = CASES[name]
    width = 64 if wide else -(-max(kv_lens) // PAGE_SIZE)
    q, kv, batch = make_batch(rng, q_lens, kv_lens, kv_heads=2, group=group,
                              num_tokens=sum(q_lens) + 3, num_seqs=16, width=width,
                              num_pages=16 * width)
    check(q, kv, batch)


@pytest.mark.slow
def test_random_mixed_steps_sweep(rng):
    """Random mixes in fixed shapes: T=384 rows, S=12 sequences, 40 pages of 8 per sequence."""
    T, S, W = 384, 12, 40
    for trial in range(24):
        n = int(rng.integers(1, S + 1))
        kind = rng.choice(["decode", "short", "long", "idle"], n, p=[0.5, 0.25, 0.1, 0.15])
        q_lens = [{"decode": 1, "idle": 0, "short": int(rng.integers(2, 70)),
                   "long": int(rng.integers(64, 200))}[k] for k in kind]
        while sum(q_lens) > T:
            q_lens[int(np.argmax(q_lens))] //= 2
        kv_lens = [q + int(rng.integers(0 if q else 1, W * PAGE_SIZE - q + 1)) for q in q_lens]
        q, kv, batch = make_batch(rng, q_lens, kv_lens, kv_heads=2, group=1 + trial % 3,
                                  num_tokens=T, num_seqs=S, width=W, num_pages=S * W)
        check(q, kv, batch)


def test_two_query_ranges_share_one_context_in_tiles(rng):
    """A dropped front recomputed (70 rows) next to the new prompt (66 rows), one page table."""
    q, kv, batch = make_batch(rng, [70, 66, 1], [70, 200, 20], kv_heads=2, group=2,
                              num_tokens=144, num_seqs=3, width=25)
    batch = batch._replace(page_table=np.concatenate([batch.page_table[1:2]] * 2
                                                     + [batch.page_table[2:]]))
    check(q, kv, batch)


def test_work_item_sizes_are_whole_pages():
    assert LAST_ROWS_KEYS % PAGE_SIZE == 0 and TILE_KEYS % PAGE_SIZE == 0 and TILE_ROWS >= 1


# --- runner ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runner():
    return ModelRunner(load_model("random:tiny", "float32"), num_pages=96, page_size=PAGE_SIZE,
                       max_num_seqs=8, max_batched_tokens=256, max_model_len=512)


def make_step(seqs, vocab, rng):
    """seqs: (first page, history tokens, new tokens); each sequence's pages are consecutive."""
    tokens, positions, table, kv_lens, cu = [], [], [], [], [0]
    width = max(-(-(h + n) // PAGE_SIZE) for _, h, n in seqs)
    for first, h, n in seqs:
        pages = -(-(h + n) // PAGE_SIZE)
        table.append(list(range(first, first + pages)) + [0] * (width - pages))
        tokens += list(rng.integers(0, vocab, n))
        positions += list(range(h, h + n))
        kv_lens.append(h + n)
        cu.append(cu[-1] + n)
    k = len(seqs)
    return StepInput(np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
                     np.asarray(table, np.int32), np.asarray(kv_lens, np.int32),
                     np.asarray(cu, np.int32), np.zeros(k, np.float32), np.zeros(k, np.int32),
                     np.ones(k, np.float32), np.zeros(k, np.uint32), np.zeros(k, np.int32))


@pytest.mark.slow
def test_runner_mixed_step_matches_sequences_alone(tiny_runner, rng):
    """A step mixing a 100-token prompt, a 70-token continuation and two decodes samples the
    same greedy tokens as each sequence run alone over the same cache (other programs)."""
    r = tiny_runner
    vocab = r.config.vocab_size
    r.reset_kv()
    r.step(make_step([(16, 0, 30), (32, 0, 12), (48, 0, 5)], vocab, rng))     # histories
    cache = jax.tree.map(np.asarray, r.kv)
    mixed = make_step([(0, 0, 100), (16, 30, 70), (32, 12, 1), (48, 5, 1)], vocab, rng)
    together = r.step(mixed)
    alone = []
    for i in range(4):
        r.kv = jax.tree.map(jnp.asarray, cache)
        lo, hi = mixed.cu_q_lens[i], mixed.cu_q_lens[i + 1]
        one = StepInput(mixed.token_ids[lo:hi], mixed.positions[lo:hi], mixed.page_table[i:i + 1],
                        mixed.kv_lens[i:i + 1], np.asarray([0, hi - lo], np.int32),
                        *(a[i:i + 1] for a in mixed[5:]))
        alone.append(int(r.step(one)[0]))
    np.testing.assert_array_equal(together, alone)


def test_step_input_table_stops_at_each_rows_kv_len():
    """Pages a conversation holds past a row's kv_len stay out of the table (and the width)."""
    def row(pages, start, end):
        conv = types.SimpleNamespace(pages=pages, id="c")
        req = types.SimpleNamespace(conversation=conv, token_ids=list(range(100)), output=[],
                                    params=types.SimpleNamespace(temperature=0.0, top_k=0,
                                                                 top_p=1.0), seed=0)
        return types.SimpleNamespace(request=req, start=start, end=end)

    s = step_input([row([4, 5, 6, 7, 8, -1], 10, 12), row([9, 10, 11], 0, 20)], page_size=8)
    np.testing.assert_array_equal(s.page_table, [[4, 5, 0], [9, 10, 11]])
    assert list(s.kv_lens) == [12, 20] and list(s.cu_q_lens) == [0, 2, 22]
    with pytest.raises(RuntimeError, match="scheduler bug"):
        step_input([row([4, -1, 6], 0, 12)], page_size=8)
