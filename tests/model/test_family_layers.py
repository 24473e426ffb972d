"""The family features inside the model: biases, q/k norms and the window in every layout (the
fused per-layer kernels, tensor-parallel specs, the Pallas path), RoPE scalings, configs."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import run_model
from pensieve_jax.model import parallel
from pensieve_jax.model.attention import AttentionBatch, init_kv_cache
from pensieve_jax.model.config import PRESETS, ModelConfig
from pensieve_jax.model.llama import Llama, param_shapes, unstack_kernels
from pensieve_jax.model.rope import (RopeScaling, dynamic_inv_freq, inv_freq, positions_rope,
                                     rope_tables)
from pensieve_jax.weights.assemble import random_params

FAMILY = dataclasses.replace(PRESETS["tiny"], qkv_bias=True, o_bias=True, qk_norm=True,
                             sliding_window=6, name="random:tiny-family")


@pytest.fixture(scope="module")
def params():
    return random_params(FAMILY, jnp.float32, seed=4, std=0.2)


@pytest.mark.slow
def test_per_layer_kernels_keep_biases_and_equal_stacked(params, rng):
    stripped, kernels = unstack_kernels(params)
    layers = stripped["params"]["layers"]
    assert set(layers["q_proj"]) == {"bias"} and set(layers["o_proj"]) == {"bias"}
    assert "gate_proj" not in layers and "q_norm" in layers
    assert float(jnp.abs(layers["q_proj"]["bias"]).max()) > 0      # biases are not zeros
    tokens = rng.integers(0, FAMILY.vocab_size, 14)
    kv0 = init_kv_cache(FAMILY.num_layers, 8, 4, FAMILY.num_kv_heads, FAMILY.head_dim)
    batch = AttentionBatch(np.asarray([[5, 0, 3, 6]], np.int32), np.asarray([14], np.int32),
                           np.asarray([0, 14], np.int32))
    pos = np.arange(14, dtype=np.int32)
    model = Llama(FAMILY)
    ref, _ = jax.jit(model.apply)(params, tokens, pos, kv0, batch)
    out, _ = jax.jit(lambda p, k, *a: model.apply(p, *a, layer_kernels=k))(
        stripped, kernels, tokens, pos, kv0, batch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.slow
def test_each_feature_changes_the_output(params, rng):
    """Biases, q/k norms and the window are applied, not ignored."""
    tokens = rng.integers(0, FAMILY.vocab_size, 20)
    table = [list(range(5))]
    base, _ = run_model(Llama(FAMILY), params, FAMILY, [tokens], [0], table)
    for field in ("qkv_bias", "o_bias", "qk_norm", "sliding_window"):
        off = dataclasses.replace(FAMILY, **{field: None if field == "sliding_window" else False})
        p = params
        if field in ("qkv_bias", "o_bias", "qk_norm"):
            layers = dict(params["params"]["layers"])
            if field == "qk_norm":
                del layers["q_norm"], layers["k_norm"]
            for name in {"qkv_bias": ("q_proj", "k_proj", "v_proj"), "o_bias": ("o_proj",),
                         "qk_norm": ()}[field]:
                layers[name] = {"kernel": layers[name]["kernel"]}
            p = {"params": {**params["params"], "layers": layers}}
        out, _ = run_model(Llama(off), p, off, [tokens], [0], table)
        assert np.abs(out - base).max() > 1e-3, field
    # the window only matters past it: the first `window` positions are unchanged
    off = dataclasses.replace(FAMILY, sliding_window=None)
    out, _ = run_model(Llama(off), params, off, [tokens], [0], table)
    np.testing.assert_allclose(out[:FAMILY.sliding_window], base[:FAMILY.sliding_window],
                               atol=1e-5)


@pytest.mark.slow
def test_pallas_matches_xla_with_window_in_the_model(params, rng):
    """The whole model with the Pallas kernel (interpret mode) and a window against XLA."""
    hist, new = rng.integers(0, FAMILY.vocab_size, 11), rng.integers(0, FAMILY.vocab_size, 5)
    table = [[3, 1, 6, 0, 7], [2, 5, 0, 0, 0]]
    outs = []
    for backend in ("xla", "pallas"):
        model = Llama(FAMILY, attention=backend, interpret=True)
        _, kv = run_model(model, params, FAMILY, [hist], [0], table[:1])
        logits, _ = run_model(model, params, FAMILY, [new, hist[:1]], [11, 0], table, kv=kv)
        outs.append(logits)
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-5)


def test_bias_and_norm_partition_specs():
    tree = param_shapes(dataclasses.replace(FAMILY, num_heads=8, num_kv_heads=4))
    specs = jax.tree_util.tree_map_with_path(
        lambda path, x: parallel.param_spec(parallel.path_names(path), tuple(x.shape), 2), tree)
    layers = specs["params"]["layers"]
    for name in ("q_proj", "k_proj", "v_proj"):           # along their kernels' columns
        assert layers[name]["bias"] == P(None, "tp"), name
    assert layers["o_proj"]["kernel"] == P(None, "tp", None)
    assert layers["o_proj"]["bias"] == P(None, None)         # added once, after the reduce
    assert layers["q_norm"]["weight"] == P(None, None) == layers["k_norm"]["weight"]


# -- RoPE ---------------------------------------------------------------------------------------------

def test_dynamic_rope_scales_only_past_the_original_length():
    s = RopeScaling("dynamic", 2.0, original_max_position_embeddings=32)
    positions = jnp.arange(48, dtype=jnp.int32)
    per_token = np.asarray(dynamic_inv_freq(positions, 16, 10000.0, s))
    plain = inv_freq(16, 10000.0, None)
    np.testing.assert_array_equal(per_token[:32], np.broadcast_to(plain, (32, 8)))
    for p in (32, 40, 47):     # transformers' formula at sequence length p + 1
        base = 10000.0 * (2.0 * (p + 1) / 32 - 1.0) ** (16 / 14)
        want = 1.0 / base ** (np.arange(0, 16, 2) / 16)
        np.testing.assert_allclose(per_token[p], want, rtol=1e-5)
    assert np.all(per_token[47, 1:] < per_token[40, 1:])      # lower frequencies as it grows
    cos, _ = positions_rope(positions, 16, 10000.0, s)
    want_cos, _ = rope_tables(positions[40:41], jnp.asarray(per_token[40]))
    np.testing.assert_allclose(np.asarray(cos[40:41]), np.asarray(want_cos), rtol=1e-6)


def test_yarn_interpolates_low_frequencies_and_scales_cos_sin():
    s = RopeScaling("yarn", 4.0, original_max_position_embeddings=4096)
    plain, scaled = inv_freq(64, 10000.0, None), inv_freq(64, 10000.0, s)
    np.testing.assert_allclose(scaled[:4], plain[:4], rtol=1e-6)          # fast: kept
    np.testing.assert_allclose(scaled[-4:], plain[-4:] / 4.0, rtol=1e-6)  # slow: interpolated
    factor = 0.1 * math.log(4.0) + 1.0
    cos, sin = positions_rope(jnp.arange(3), 64, 10000.0, s)
    ref_cos, ref_sin = rope_tables(jnp.arange(3), jnp.asarray(scaled))
    np.testing.assert_allclose(np.asarray(cos), np.asarray(ref_cos) * factor, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), np.asarray(ref_sin) * factor, rtol=1e-6)


def test_rope_scaling_and_window_validation():
    with pytest.raises(ValueError, match=r"unsupported rope scaling type 'ntk' \(supported: "
                                         r"linear, llama3, freq_factors, yarn, dynamic\)"):
        RopeScaling("ntk", 2.0)
    with pytest.raises(ValueError, match="sliding_window must be None or an integer >= 1"):
        dataclasses.replace(FAMILY, sliding_window=0)


# -- configs and presets ------------------------------------------------------------------------------

def test_config_dict_round_trip_keeps_family_fields():
    c = dataclasses.replace(FAMILY, rope_scaling=RopeScaling(
        "yarn", 4.0, original_max_position_embeddings=1024, beta_fast=16.0,
        attention_factor=1.2))
    assert ModelConfig.from_dict(c.to_dict()) == c
    old = {k: v for k, v in PRESETS["tiny"].to_dict().items()
           if k not in ("qkv_bias", "o_bias", "qk_norm", "sliding_window")}
    assert ModelConfig.from_dict(old) == PRESETS["tiny"]      # a converted model of before


@pytest.mark.parametrize("name,billions,window", [
    ("qwen3-8b", 8.19, None), ("qwen2.5-7b", 7.62, None), ("qwen2.5-0.5b", 0.49, None),
    ("mistral-7b-v0.1", 7.24, 4096), ("mistral-7b", 7.25, None)])
def test_presets_have_the_real_parameter_counts(name, billions, window):
    c = PRESETS[name]
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(c)))
    assert count / 1e9 == pytest.approx(billions, abs=0.01)
    assert c.sliding_window == window and c.name == f"random:{name}"
