"""The CPU decode-attention kernel (cpu_kernels/decode_attention.cc) against its dense
reference, over page sizes, head layouts, ragged and empty contexts, sliding windows, layers and
bad page ids; and the runner's use of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from cpu_kernels import paged_decode_attention, paged_decode_attention_reference

pytestmark = pytest.mark.skipif(not cpu_kernels.load(), reason=cpu_kernels.status())


def case(seed, num_seqs, heads, kv_heads, head_dim, page_size, width, kv_lens, layers=2,
         num_pages=None):
    rng = np.random.default_rng(seed)
    num_pages = num_pages or num_seqs * width + 3
    pool = (layers, num_pages, page_size, kv_heads, head_dim)
    k, v = (jnp.asarray(rng.standard_normal(pool, np.float32)) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((num_seqs, heads, head_dim), np.float32))
    table = jnp.asarray(rng.permutation(num_pages)[:num_seqs * width].reshape(num_seqs, width),
                        jnp.int32)
    return q, k, v, table, jnp.asarray(kv_lens, jnp.int32)


def check(q, k, v, table, kv_lens, layer=1, window=None, scale=0.3):
    args = (q, k, v, jnp.int32(layer), table, kv_lens)
    got = jax.jit(lambda *a: paged_decode_attention(*a, sm_scale=scale,
                                                    sliding_window=window))(*args)
    want = paged_decode_attention_reference(*args, sm_scale=scale, sliding_window=window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    return got


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(1, 1, 8), (4, 2, 16), (9, 3, 64),
                                                     (8, 1, 128)])
def test_matches_reference(page_size, heads, kv_heads, head_dim):
    width = 600 // page_size + 1                     # contexts past one 256-key split
    lens = [1, 600, 257, 37]
    check(*case(0, 4, heads, kv_heads, head_dim, page_size, width, lens))


@pytest.mark.parametrize("window", [1, 5, 300])
def test_sliding_window(window):
    check(*case(1, 3, 4, 2, 16, 4, 160, [3, 640, 299]), window=window)


def test_empty_context_gives_zero_and_lengths_are_clipped_to_the_table():
    q, k, v, table, _ = case(2, 3, 4, 2, 16, 4, 5, [0, 0, 0])
    got = check(q, k, v, table, jnp.asarray([0, 20, 999], jnp.int32))   # 999 > 5 pages * 4
    assert not np.asarray(got[0]).any()


def test_bad_page_ids_contribute_no_keys_and_read_nothing_outside():
    q, k, v, table, lens = case(3, 2, 4, 2, 16, 4, 6, [24, 24])
    table = table.at[0, 1].set(-7).at[1, 4].set(10_000)
    check(q, k, v, table, lens)


def test_each_layer_reads_its_own_pool():
    q, k, v, table, lens = case(4, 2, 4, 2, 16, 4, 6, [21, 9], layers=3)
    outs = [check(q, k, v, table, lens, layer=layer) for layer in range(3)]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_shapes_and_dtypes_are_checked_with_the_reason():
    q, k, v, table, lens = case(5, 2, 4, 2, 16, 4, 6, [5, 5])
    with pytest.raises(ValueError, match="shapes do not agree"):
        paged_decode_attention(q[:, :3], k, v, 0, table, lens, sm_scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        paged_decode_attention(q.astype(jnp.bfloat16), k, v, 0, table, lens, sm_scale=1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(q, k, v, 0, table, lens, sm_scale=1.0, sliding_window=0)


def test_loading_the_kernels_leaves_the_process_floating_point_mode_alone():
    """Built with fast math, linked without it: no flush-to-zero for the whole process (a
    subnormal float32 survives arithmetic after the library is loaded)."""
    assert cpu_kernels.load()
    tiny = np.nextafter(np.float32(0), np.float32(1))
    assert tiny > 0 and tiny * np.float32(1.0) > 0 and np.float32(1e-39) * np.float32(2) > 0
