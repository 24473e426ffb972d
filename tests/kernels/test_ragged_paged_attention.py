"""The Pallas kernel (interpret mode on CPU) against its jnp reference, and the KV page moves."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (copy_pages, copy_pages_reference, ragged_paged_attention,
                            ragged_paged_attention_reference, ragged_paged_attention_stacked,
                            write_kv_rows, write_kv_rows_reference)


def make_case(seed, q_lens, history, *, heads, kv_heads, head_dim=64, page_size=8, pad_rows=3,
              dtype=jnp.float32):
    """kv_lens = q_len + history (any value, not page multiples); pages shuffled over the pool."""
    rng = np.random.default_rng(seed)
    kv_lens = [q + h for q, h in zip(q_lens, history)]
    pages_needed = [-(-k // page_size) for k in kv_lens]
    num_pages = sum(pages_needed) + 5
    perm = rng.permutation(num_pages)
    table = np.zeros((len(q_lens), max(max(pages_needed), 1) + 1), np.int32)
    used = 0
    for s, n in enumerate(pages_needed):
        table[s, :n] = perm[used:used + n]
        used += n
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + pad_rows, heads, head_dim)), dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return q, k, v, jnp.asarray(table), jnp.asarray(kv_lens, jnp.int32), cu


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)


# make test runs two corners of the sweep (each case interprets the kernel: 10-25 s on 2
# cores); the rest are slow (`make test-all`, and .ci/run runs them)
@pytest.mark.parametrize("page_size,group", [
    (8, 1), (16, 4), *(pytest.param(p, g, marks=pytest.mark.slow)
                       for p, g in ((8, 3), (8, 4), (8, 8), (16, 1), (16, 3), (16, 8)))])
def test_mixed_batch_matches_reference(group, page_size):
    rng = np.random.default_rng(1000 * group + page_size)
    q_lens = [int(x) for x in rng.integers(0, 2 * page_size + 3, 4)] + [1, 1]
    history = [int(x) for x in rng.integers(0, 3 * page_size, 6)]
    args = make_case(group + page_size, q_lens, history, heads=2 * group, kv_heads=2,
                     page_size=page_size)
    out = ragged_paged_attention(*args, interpret=True)
    ref = ragged_paged_attention_reference(*args)
    assert rel_err(out, ref) < 1e-5
    assert bool(jnp.isfinite(out).all())
    assert np.all(np.asarray(out)[sum(q_lens):] == 0)          # padding rows untouched


@pytest.mark.parametrize("dtype,tol", [pytest.param(jnp.bfloat16, 2e-2, marks=pytest.mark.slow),
                                       (jnp.float16, 2e-2)])
def test_half_precision_inputs(dtype, tol):
    args = make_case(7, [9, 1, 0, 4], [5, 40, 3, 0], heads=8, kv_heads=2, dtype=dtype)
    out = ragged_paged_attention(*args, interpret=True)
    assert out.dtype == dtype
    ref = ragged_paged_attention_reference(*(a.astype(jnp.float32) if a.dtype == dtype else a
                                             for a in args))
    assert rel_err(out, ref) < tol


def test_decode_batch_with_context_splits_and_head_dim_128():
    """A decode-only step over long contexts: the context is split over programs and combined."""
    args = make_case(11, [1] * 4, [150, 37, 1, 90], heads=8, kv_heads=2, head_dim=128,
                     page_size=16, pad_rows=0)
    out = ragged_paged_attention_stacked(args[0], args[1][None], args[2][None], jnp.int32(0),
                                         *args[3:], interpret=True, num_splits=4)
    assert rel_err(out, ragged_paged_attention_reference(*args)) < 1e-5


def test_two_query_ranges_share_one_context():
    """Pensieve's recompute: the dropped front and the new prompt as two rows, one page row."""
    q, k, v, table, _, _ = make_case(3, [6, 5], [0, 6], heads=4, kv_heads=2)
    table = jnp.stack([table[1], table[1]])
    kv_lens = jnp.asarray([6, 11], jnp.int32)          # front: positions 0-5; prompt: 6-10
    cu = jnp.asarray([0, 6, 11], jnp.int32)
    out = ragged_paged_attention(q, k, v, table, kv_lens, cu, interpret=True)
    whole = ragged_paged_attention_reference(q, k, v, table[:1], jnp.asarray([11], jnp.int32),
                                             jnp.asarray([0, 11], jnp.int32))
    assert rel_err(out[:11], whole[:11]) < 1e-5          # same as one 11-token prefill


def test_stacked_pools_read_the_given_layer():
    q, k, v, table, kv_lens, cu = make_case(5, [3, 1], [4, 9], heads=4, kv_heads=2)
    pool_k = jnp.stack([k * 0 + 7, k, -k])
    pool_v = jnp.stack([v * 0, v, v])
    out = ragged_paged_attention_stacked(q, pool_k, pool_v, jnp.int32(1), table, kv_lens, cu,
                                         interpret=True)
    ref = ragged_paged_attention_reference(q, k, v, table, kv_lens, cu)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("bad,match", [
    (lambda a: (a[0][0], *a[1:]), "q must be"),
    (lambda a: (a[0], a[1][None][None], *a[2:]), "k_pages must be"),
    (lambda a: (a[0][..., :32], *a[1:]), "head_dim"),
    (lambda a: (a[0][:, :3], *a[1:]), "multiple of num_kv_heads"),
    (lambda a: (*a[:4], a[4][:1], a[5]), "disagree"),
    (lambda a: (*a[:3], a[3].astype(jnp.float32), *a[4:]), "int32"),
])
def test_bad_shapes_are_clear_errors(bad, match):
    args = make_case(0, [2, 1], [3, 3], heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*bad(args), interpret=True)


def test_write_kv_rows_and_copy_pages_match_references():
    rng = np.random.default_rng(4)
    pages = jnp.asarray(rng.standard_normal((6, 4, 2, 8)), jnp.float32)
    rows = jnp.asarray(rng.standard_normal((5, 2, 8)), jnp.float32)
    ids, offs = jnp.asarray([3, 3, 0, 6, 6]), jnp.asarray([0, 1, 2, 0, 0])   # 6: padding
    want = write_kv_rows_reference(pages, rows, ids, offs)
    np.testing.assert_array_equal(np.asarray(write_kv_rows(jnp.array(pages), rows, ids, offs)),
                                  np.asarray(want))
    stacked_dst = jnp.zeros((3, 6, 4, 2, 8))
    stacked_src = jnp.asarray(rng.standard_normal((3, 5, 4, 2, 8)), jnp.float32)
    src_ids, dst_ids = jnp.asarray([4, 0, 2]), jnp.asarray([1, 5, 9])             # 9: dropped
    want = copy_pages_reference(stacked_dst, stacked_src, src_ids, dst_ids)
    got = copy_pages(jnp.array(stacked_dst), stacked_src, src_ids, dst_ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got[:, 1]), np.asarray(stacked_src[:, 4]))


def test_interpret_is_explicit():
    """interpret is a required bool: never inferred from the default backend (issue 17)."""
    args = make_case(9, [2], [1], heads=2, kv_heads=1)
    with pytest.raises(TypeError, match="interpret"):
        ragged_paged_attention(*args)
    for bad in (None, 1, "yes"):
        with pytest.raises(TypeError, match="interpret"):
            ragged_paged_attention(*args, interpret=bad)
    out = ragged_paged_attention(*args, interpret=True)
    assert rel_err(out, ragged_paged_attention_reference(*args)) < 1e-5


# -- sliding window ---------------------------------------------------------------------------

def poison_before_windows(args, window, page_size, keys_per_block):
    """NaN in every page a windowed kernel must never read: for each sequence, the pages wholly
    before the block (keys_per_block keys, aligned) holding its first row's window start (but
    not a page another row of the table names: padding entries name page 0, and the last page
    block a kernel reads may hold them, masked)."""
    q, k, v, table, kv_lens, cu = args
    table, kv_lens, cu = np.asarray(table), np.asarray(kv_lens), np.asarray(cu)
    k, v = np.array(k), np.array(v)
    poisoned = set()
    for s in range(len(kv_lens)):
        q_len = int(cu[s + 1] - cu[s])
        if q_len == 0:
            continue
        first_key = max(int(kv_lens[s]) - q_len - window + 1, 0)
        unread = first_key // keys_per_block * keys_per_block // page_size
        others = set(np.delete(table, s, axis=0).ravel()) | set(table[s, unread:].ravel())
        poisoned |= set(table[s, :unread].tolist()) - others
    k[sorted(poisoned)] = np.nan
    v[sorted(poisoned)] = np.nan
    return (q, jnp.asarray(k), jnp.asarray(v), *args[3:]), len(poisoned)


@pytest.mark.parametrize("window", [1, pytest.param(5, marks=pytest.mark.slow), 16,
                                    pytest.param(40, marks=pytest.mark.slow)])
@pytest.mark.parametrize("page_size", [4, 16])
def test_sliding_window_matches_reference(window, page_size):
    """Mixed prefill / decode rows, contexts shorter and longer than the window."""
    args = make_case(50 + window, [1, 9, 0, 20, 1], [60, 3, 10, 30, 7], heads=4, kv_heads=2,
                     head_dim=32, page_size=page_size)
    out = ragged_paged_attention(*args, interpret=True, sliding_window=window)
    ref = ragged_paged_attention_reference(*args, sliding_window=window)
    assert rel_err(out, ref) < 1e-5
    assert np.all(np.asarray(out)[31:] == 0)
    if window < 30:    # the window changes the answer: it is applied, not ignored
        assert rel_err(ref, ragged_paged_attention_reference(*args)) > 1e-2


@pytest.mark.parametrize("num_splits", [None, pytest.param(1, marks=pytest.mark.slow),
                                        pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("window,q_lens", [   # make test: the first; .ci/run: all
    (16, [1, 1, 1]), pytest.param(24, [5, 1, 12], marks=pytest.mark.slow),
    pytest.param(70, [1, 3, 1], marks=pytest.mark.slow)])
def test_sliding_window_never_reads_pages_before_it(window, q_lens, num_splits):
    """Pages wholly before a sequence's window (in whole page blocks) hold NaN: the output is
    still the reference's on clean pages, so they were never read; with context splits too."""
    page_size = 8
    args = make_case(window, q_lens, [200, 151, 97], heads=4, kv_heads=2, head_dim=32,
                     page_size=page_size, pad_rows=2)
    pages_per_block = max(1, 64 // page_size)          # the kernel's page block
    poisoned_args, poisoned = poison_before_windows(args, window, page_size,
                                                    pages_per_block * page_size)
    assert poisoned >= 10
    out = ragged_paged_attention_stacked(
        poisoned_args[0], poisoned_args[1][None], poisoned_args[2][None], jnp.int32(0),
        *poisoned_args[3:], interpret=True, num_splits=num_splits, sliding_window=window)
    ref = ragged_paged_attention_reference(*args, sliding_window=window)
    assert bool(jnp.isfinite(out).all())
    assert rel_err(out, ref) < 1e-5


def test_sliding_window_must_be_positive():
    args = make_case(0, [2], [3], heads=2, kv_heads=1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window must be None or an integer"):
            ragged_paged_attention(*args, interpret=True, sliding_window=bad)
