"""The Flax model over a paged KV cache: cached paths equal recomputing from scratch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_model
from pensieve_jax.model.config import PRESETS, RopeScaling
from pensieve_jax.model.attention import AttentionBatch, init_kv_cache
from pensieve_jax.model.llama import Llama, unstack_kernels
from pensieve_jax.model.rope import apply_rope, rope_tables
from pensieve_jax.weights.assemble import random_params

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model_and_params():
    return Llama(CONFIG), random_params(CONFIG, jnp.float32, seed=1, std=0.1)


def test_incremental_decode_equals_full_prefill(model_and_params, rng):
    model, params = model_and_params
    tokens = rng.integers(0, CONFIG.vocab_size, 13)
    table = [[7, 2, 9, 4]]                                   # scattered, out of order
    full, _ = run_model(model, params, CONFIG, [tokens], [0], table)
    part, kv = run_model(model, params, CONFIG, [tokens[:6]], [0], table)
    rows = [part]
    for i in range(6, 13):
        step, kv = run_model(model, params, CONFIG, [tokens[i:i + 1]], [i], table, kv=kv)
        rows.append(step)
    np.testing.assert_allclose(np.concatenate(rows), full, atol=1e-5)
    assert (np.concatenate(rows).argmax(-1) == full.argmax(-1)).all()


@pytest.mark.slow
def test_chunked_prefill_equals_one_shot(model_and_params, rng):
    model, params = model_and_params
    tokens = rng.integers(0, CONFIG.vocab_size, 11)
    table = [[3, 1, 8]]
    full, _ = run_model(model, params, CONFIG, [tokens], [0], table)
    a, kv = run_model(model, params, CONFIG, [tokens[:5]], [0], table)
    b, _ = run_model(model, params, CONFIG, [tokens[5:]], [5], table, kv=kv)
    np.testing.assert_allclose(np.concatenate([a, b]), full, atol=1e-5)


@pytest.mark.slow    # ~12 s; the engine and attention tests cover mixed batches in make test; .ci/run runs it
def test_mixed_batch_equals_sequences_alone(model_and_params, rng):
    """One step with a prefill over history, a decode and a fresh prompt, plus padding rows."""
    model, params = model_and_params
    hist_a, new_a = rng.integers(0, CONFIG.vocab_size, 6), rng.integers(0, CONFIG.vocab_size, 4)
    hist_b, new_b = rng.integers(0, CONFIG.vocab_size, 9), rng.integers(0, CONFIG.vocab_size, 1)
    new_c = rng.integers(0, CONFIG.vocab_size, 3)
    table = [[5, 0, 11, 0], [2, 6, 3, 0], [9, 0, 0, 0]]
    _, kv = run_model(model, params, CONFIG, [hist_a, hist_b], [0, 0], table[:2])
    mixed, _ = run_model(model, params, CONFIG, [new_a, new_b, new_c], [6, 9, 0], table, kv=kv,
                         pad_to=16)
    alone = [run_model(model, params, CONFIG, [np.concatenate([h, n])], [0], [t])[0][len(h):]
             for h, n, t in ((hist_a, new_a, table[0]), (hist_b, new_b, table[1]),
                             (np.zeros(0, np.int64), new_c, table[2]))]
    np.testing.assert_allclose(mixed, np.concatenate(alone), atol=1e-5)


@pytest.mark.slow    # ~6 s; .ci/run runs it
def test_padding_rows_do_not_touch_the_cache(model_and_params, rng):
    model, params = model_and_params
    tokens = rng.integers(0, CONFIG.vocab_size, 5)
    _, kv_plain = run_model(model, params, CONFIG, [tokens], [0], [[1, 2]])
    _, kv_padded = run_model(model, params, CONFIG, [tokens], [0], [[1, 2]], pad_to=16)
    for plain, padded in ((kv_plain.k, kv_padded.k), (kv_plain.v, kv_padded.v)):
        padded = np.asarray(padded)
        others = np.delete(padded, [1, 2], axis=1)
        assert np.count_nonzero(others) == 0              # no page outside the table written
        assert np.count_nonzero(padded[:, 2, 1:]) == 0    # nor slots past the 5 real tokens
        # (matmuls over 16 rows instead of 5 may round differently in the last bit)
        np.testing.assert_allclose(padded, np.asarray(plain), atol=1e-5)


@pytest.mark.slow
def test_logits_indices_select_rows(model_and_params, rng):
    from pensieve_jax.model.attention import AttentionBatch, init_kv_cache
    model, params = model_and_params
    tokens = rng.integers(0, CONFIG.vocab_size, 6).astype(np.int32)
    kv = init_kv_cache(CONFIG.num_layers, 8, 4, CONFIG.num_kv_heads, CONFIG.head_dim)
    batch = AttentionBatch(np.array([[0, 1]], np.int32), np.array([6], np.int32),
                           np.array([0, 6], np.int32))
    pos = np.arange(6, dtype=np.int32)
    full, _ = model.apply(params, tokens, pos, kv, batch)
    picked, _ = model.apply(params, tokens, pos, kv, batch, np.array([5, 2], np.int32))
    np.testing.assert_allclose(np.asarray(picked), np.asarray(full)[[5, 2]], atol=1e-6)


@pytest.mark.slow
def test_bfloat16_model_tracks_float32(rng):
    config = CONFIG
    params32 = random_params(config, jnp.float32, seed=2, std=0.1)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    tokens = rng.integers(0, config.vocab_size, 8)
    ref, _ = run_model(Llama(config), params32, config, [tokens], [0], [[0, 1]])
    kv16 = None
    from pensieve_jax.model.attention import init_kv_cache
    kv16 = init_kv_cache(config.num_layers, 32, 4, config.num_kv_heads, config.head_dim,
                         jnp.bfloat16)
    out, kv16 = run_model(Llama(config, jnp.bfloat16), params16, config, [tokens], [0], [[0, 1]],
                          kv=kv16)
    assert kv16.k.dtype == jnp.bfloat16
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_rope_rotates_pairs_by_position():
    """Rotate-half RoPE: the dot product of q at m and k at n depends only on m - n."""
    inv = jnp.asarray(CONFIG.rope_inv_freq())
    x = jax.random.normal(jax.random.key(0), (1, 1, CONFIG.head_dim))
    y = jax.random.normal(jax.random.key(1), (1, 1, CONFIG.head_dim))

    def dot(m, n):
        cm, sm = rope_tables(jnp.array([m]), inv)
        cn, sn = rope_tables(jnp.array([n]), inv)
        return float((apply_rope(x, cm, sm) * apply_rope(y, cn, sn)).sum())

    assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-4)
    assert dot(7, 3) != pytest.approx(dot(7, 4), rel=1e-3)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    base = PRESETS["llama3-8b"]
    plain = dataclasses.replace(base, rope_scaling=None).rope_inv_freq()
    scaled = base.rope_inv_freq()
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4.0            # short wavelengths: untouched
    low = wavelen > 8192 / 1.0             # long wavelengths: divided by factor
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8.0)
    lin = dataclasses.replace(base, rope_scaling=RopeScaling("linear", 2.0)).rope_inv_freq()
    np.testing.assert_allclose(lin, plain / 2.0, rtol=1e-6)


@pytest.mark.slow
def test_pallas_backend_matches_xla_in_the_model(model_and_params, rng):
    """The whole model with the Pallas kernel (interpret mode here) against the XLA path."""
    _, params = model_and_params
    hist, new = rng.integers(0, CONFIG.vocab_size, 7), rng.integers(0, CONFIG.vocab_size, 5)
    table = [[3, 1, 6, 0], [2, 5, 0, 0]]
    outs = []
    for backend in ("xla", "pallas"):
        model = Llama(CONFIG, attention=backend, interpret=True)   # explicit: CPU here
        _, kv = run_model(model, params, CONFIG, [hist], [0], table[:1])
        logits, _ = run_model(model, params, CONFIG, [new, hist[:1]], [7, 0], table, kv=kv)
        outs.append(logits)
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-5)


@pytest.mark.slow
def test_per_layer_kernels_equal_stacked(model_and_params, rng):
    """The CPU layout (each layer's matmul kernels an array of its own, picked by a switch;
    q/k/v and gate/up fused) computes what the stacked layout does, cache included."""
    model, params = model_and_params
    stripped, kernels = unstack_kernels(params)
    assert "q_proj" not in stripped["params"]["layers"]
    assert len(kernels["qkv_proj"]) == CONFIG.num_layers
    tokens = rng.integers(0, CONFIG.vocab_size, 9)
    table = [[5, 0, 3]]
    kv0 = init_kv_cache(CONFIG.num_layers, 32, 4, CONFIG.num_kv_heads, CONFIG.head_dim)
    pos = np.arange(9, dtype=np.int32)
    batch = AttentionBatch(np.asarray(table, np.int32), np.asarray([9], np.int32),
                           np.asarray([0, 9], np.int32))
    ref, kv_ref = jax.jit(model.apply)(params, tokens, pos, kv0, batch)
    out, kv_out = jax.jit(lambda p, k, *a: model.apply(p, *a, layer_kernels=k))(
        stripped, kernels, tokens, pos, kv0, batch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(kv_out.k), np.asarray(kv_ref.k), atol=1e-6)
    assert (np.asarray(out).argmax(-1) == np.asarray(ref).argmax(-1)).all()
