"""The XLA paged-attention path against plain dense attention, and KV writes into pages."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dense_attention
from pensieve_jax.model.attention import (AttentionBatch, KVCache, get_attention, token_slots,
                                    write_kv, xla_paged_attention)


def make_case(rng, q_lens, kv_lens, heads=4, kv_heads=2, head_dim=16, page_size=4, num_pages=40,
              pad_rows=3, dtype=np.float32):
    """Random pools and a batch with each sequence's pages scattered over the pool."""
    num_seqs = len(q_lens)
    max_pages = max(-(-k // page_size) for k in kv_lens)
    perm = rng.permutation(num_pages)
    page_table = np.zeros((num_seqs, max_pages + 1), np.int32)
    used = 0
    for s, k in enumerate(kv_lens):
        n = -(-k // page_size)
        page_table[s, :n] = perm[used:used + n]
        used += n
    k_pool = rng.standard_normal((1, num_pages, page_size, kv_heads, head_dim)).astype(dtype)
    v_pool = rng.standard_normal((1, num_pages, page_size, kv_heads, head_dim)).astype(dtype)
    total = sum(q_lens)
    q = rng.standard_normal((total + pad_rows, heads, head_dim)).astype(dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    batch = AttentionBatch(page_table, np.asarray(kv_lens, np.int32), cu)
    return q, KVCache(k_pool, v_pool), batch


def reference(q, kv, batch, sm_scale):
    out = np.zeros(q.shape, np.float64)
    ps = kv.k.shape[2]
    for s in range(len(batch.kv_lens)):
        lo, hi = batch.cu_q_lens[s], batch.cu_q_lens[s + 1]
        if hi == lo:
            continue
        ctx = batch.kv_lens[s]
        pages = batch.page_table[s, : -(-ctx // ps)]
        k = np.asarray(kv.k[0])[pages].reshape(-1, *kv.k.shape[3:])[:ctx]
        v = np.asarray(kv.v[0])[pages].reshape(-1, *kv.v.shape[3:])[:ctx]
        q_pos = np.arange(ctx - (hi - lo), ctx)
        out[lo:hi] = dense_attention(np.asarray(q[lo:hi]), k, v, q_pos, sm_scale)
    return out


DENSE_CASES = [
    ([5], [5]),                    # prefill from scratch
    ([1, 1, 1], [9, 1, 17]),       # decodes
    ([7, 1, 0, 3], [20, 6, 4, 3]), # mixed: prefill over history, decode, idle row, fresh prefill
]


# make test: every case with one query head per KV head, and the prefill with two; the other
# grouped cases are slow (.ci/run runs them)
@pytest.mark.parametrize("group,q_lens,kv_lens", [
    pytest.param(group, q_lens, kv_lens, id=f"{group}-q_lens{i}-kv_lens{i}",
                 marks=pytest.mark.slow if group == 2 and i > 0 else ())
    for group in (1, 2) for i, (q_lens, kv_lens) in enumerate(DENSE_CASES)])
def test_matches_dense_attention(rng, q_lens, kv_lens, group):
    q, kv, batch = make_case(rng, q_lens, kv_lens, heads=2 * group, kv_heads=2)
    scale = 16 ** -0.5
    out = xla_paged_attention(jnp.asarray(q), kv, jnp.int32(0), batch, sm_scale=scale)
    out = np.asarray(out)
    np.testing.assert_allclose(out, reference(q, kv, batch, scale), atol=2e-5)
    total = sum(q_lens)
    assert np.all(out[total:] == 0) and np.all(np.isfinite(out))


def test_two_query_ranges_share_one_context(rng):
    """Pensieve's recompute case: a dropped front and the new prompt as two rows, one page table."""
    q, kv, batch = make_case(rng, [4, 3], [4, 12])
    batch = batch._replace(page_table=np.repeat(batch.page_table[1:2], 2, axis=0))
    out = np.asarray(xla_paged_attention(jnp.asarray(q), kv, jnp.int32(0), batch,
                                         sm_scale=0.25))
    np.testing.assert_allclose(out, reference(q, kv, batch, 0.25), atol=2e-5)


def test_bfloat16_inputs_accumulate_in_float32(rng):
    q, kv, batch = make_case(rng, [6, 1], [10, 30])
    ref = reference(q, kv, batch, 0.25)
    qb = jnp.asarray(q, jnp.bfloat16)
    kvb = KVCache(jnp.asarray(kv.k, jnp.bfloat16), jnp.asarray(kv.v, jnp.bfloat16))
    out = xla_paged_attention(qb, kvb, jnp.int32(0), batch, sm_scale=0.25)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_write_kv_lands_in_the_right_slots_and_drops_padding(rng):
    num_pages, ps = 6, 4
    kv = KVCache(jnp.zeros((2, num_pages, ps, 1, 2)), jnp.zeros((2, num_pages, ps, 1, 2)))
    batch = AttentionBatch(np.array([[3, 5], [1, 0]], np.int32), np.array([6, 2], np.int32),
                           np.array([0, 2, 4], np.int32))
    positions = np.array([4, 5, 0, 1, 0, 0], np.int32)   # last two rows are padding
    slots = token_slots(jnp.asarray(positions), batch, num_pages, ps)
    np.testing.assert_array_equal(np.asarray(slots[0]), [5, 5, 1, 1, num_pages, num_pages])
    new = jnp.arange(12, dtype=jnp.float32).reshape(6, 1, 2) + 1
    out = write_kv(kv, jnp.int32(1), new, -new, slots)
    k = np.asarray(out.k)
    assert np.all(k[0] == 0)                                   # other layer untouched
    np.testing.assert_array_equal(k[1, 5, 0:2, 0], np.asarray(new[0:2, 0]))
    np.testing.assert_array_equal(k[1, 1, 0:2, 0], np.asarray(new[2:4, 0]))
    assert np.count_nonzero(k) == 8                            # padding rows wrote nothing


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_attention("nope")


# -- sliding window ---------------------------------------------------------------------------

def windowed_reference(q, kv, batch, sm_scale, window):
    """Dense attention per sequence, each row over the keys of its last `window` positions."""
    out = np.zeros(q.shape, np.float64)
    ps = kv.k.shape[2]
    heads, kv_heads = q.shape[1], kv.k.shape[3]
    for s in range(len(batch.kv_lens)):
        lo, hi = batch.cu_q_lens[s], batch.cu_q_lens[s + 1]
        ctx = batch.kv_lens[s]
        pages = batch.page_table[s, : -(-ctx // ps)]
        k = np.asarray(kv.k[0], np.float64)[pages].reshape(-1, kv_heads, q.shape[2])[:ctx]
        v = np.asarray(kv.v[0], np.float64)[pages].reshape(-1, kv_heads, q.shape[2])[:ctx]
        k, v = np.repeat(k, heads // kv_heads, 1), np.repeat(v, heads // kv_heads, 1)
        for r, pos in zip(range(lo, hi), range(ctx - (hi - lo), ctx)):
            keys = np.arange(max(0, pos - window + 1), pos + 1)
            sc = np.einsum("hd,chd->hc", np.asarray(q[r], np.float64), k[keys]) * sm_scale
            p = np.exp(sc - sc.max(-1, keepdims=True))
            out[r] = np.einsum("hc,chd->hd", p / p.sum(-1, keepdims=True), v[keys])
    return out


@pytest.mark.parametrize("window", [1, pytest.param(3, marks=pytest.mark.slow), 8,
                                    pytest.param(50, marks=pytest.mark.slow)])
def test_sliding_window_matches_dense(rng, window):
    q_lens, kv_lens = [7, 1, 0, 20, 1], [20, 6, 4, 23, 40]
    q, kv, batch = make_case(rng, q_lens, kv_lens)
    out = np.asarray(xla_paged_attention(jnp.asarray(q), kv, jnp.int32(0), batch,
                                         sm_scale=0.25, sliding_window=window))
    np.testing.assert_allclose(out, windowed_reference(q, kv, batch, 0.25, window), atol=2e-5)
    assert np.all(out[sum(q_lens):] == 0)


def test_sliding_window_never_reads_key_blocks_before_it(rng):
    """The XLA path's key blocks (whole pages, LAST_ROWS_KEYS / TILE_KEYS keys) wholly before
    a sequence's first row's window hold NaN: the output is still the clean one."""
    from pensieve_jax.model.attention import LAST_ROWS_KEYS, TILE_KEYS
    page_size, window = 8, 20
    q_lens, kv_lens = [1, 30, 1], [300, 290, 140]
    q, kv, batch = make_case(rng, q_lens, kv_lens, page_size=page_size, num_pages=120)
    block = min(LAST_ROWS_KEYS, TILE_KEYS)
    assert LAST_ROWS_KEYS % block == 0 and TILE_KEYS % block == 0
    k, v = np.array(kv.k), np.array(kv.v)
    poisoned = set()
    for s, (n, ctx) in enumerate(zip(q_lens, kv_lens)):
        first_key = ctx - n - window + 1
        unread = first_key // max(LAST_ROWS_KEYS, TILE_KEYS) * max(LAST_ROWS_KEYS, TILE_KEYS)
        pages = batch.page_table[s, :unread // page_size]
        others = set(np.delete(batch.page_table, s, 0).ravel()) | \
            set(batch.page_table[s, unread // page_size:].ravel())
        poisoned |= set(pages.tolist()) - others
    assert len(poisoned) >= 40
    k[:, sorted(poisoned)] = np.nan
    v[:, sorted(poisoned)] = np.nan
    out = np.asarray(xla_paged_attention(jnp.asarray(q), KVCache(k, v), jnp.int32(0), batch,
                                         sm_scale=0.25, sliding_window=window))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, windowed_reference(q, kv, batch, 0.25, window), atol=2e-5)
