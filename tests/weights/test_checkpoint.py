"""Converted (orbax) model directories: save_converted / load_converted, and load_model's cache."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import pensieve_jax.weights.hf_dir as hf_dir_module
from pensieve_jax.model.config import PRESETS, RopeScaling
from pensieve_jax.model.llama import param_shapes
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights import load_model
from pensieve_jax.weights.assemble import ModelLoadError
from pensieve_jax.weights.checkpoint import (MARKER, is_converted_dir, load_converted,
                                             save_converted)

# freq_factors is a tuple: it must survive the JSON round trip as one
CFG = dataclasses.replace(PRESETS["tiny"], name="tiny-ckpt", rms_norm_eps=1e-6,
                          rope_scaling=RopeScaling("freq_factors",
                                                   freq_factors=(1, 1, 1, 1, 2, 4, 8, 8)))
TEXTS = ["hello world", "<|im_start|>user\nhé<|im_end|>", ""]


def _tree_equal(got, want, dtype=None):
    got_flat = jax.tree_util.tree_flatten_with_path(got)[0]
    want_flat = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [jax.tree_util.keystr(p) for p, _ in got_flat] == \
        [jax.tree_util.keystr(p) for p, _ in want_flat]
    for (path, g), (_, w) in zip(got_flat, want_flat):
        assert g.shape == w.shape, jax.tree_util.keystr(path)
        assert g.dtype == (dtype or w.dtype), jax.tree_util.keystr(path)
        w = np.asarray(w).astype(dtype or w.dtype)  # the expected rounding, if any
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                      err_msg=jax.tree_util.keystr(path))


def _tokenizer(config):
    base = Tokenizer.byte_level(config.vocab_size)
    return Tokenizer(base.backend, bos_token_id=base.backend.token_to_id("<|im_start|>"),
                     eos_token_id=base.backend.token_to_id("<|im_end|>"),
                     chat_template=base.chat_template, add_bos_token=True, stop_token_ids=[7])


def _same_tokenizer(got: Tokenizer, want: Tokenizer):
    for text in TEXTS:
        assert got.encode(text) == want.encode(text)
        assert got.encode(text, add_special_tokens=True) == want.encode(text, True)
    assert got.to_files()[1] == want.to_files()[1]
    assert got.vocab_size == want.vocab_size
    assert got.render_chat([{"role": "user", "content": "hi"}]) == \
        want.render_chat([{"role": "user", "content": "hi"}])


def _random_params(config, seed):
    """N(0, 0.02) weights, ones for norms, as numpy (drawn in numpy: no per-leaf compiles)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['weight']"):
            return np.ones(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) * 0.02).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


@pytest.fixture(scope="module")
def tiny():
    params = _random_params(CFG, seed=4)
    return CFG, params, _tokenizer(CFG)


def test_save_load_round_trip(tmp_path, tiny):
    config, params, tok = tiny
    out = save_converted(tmp_path / "conv", config, params, tok, jnp.float32, source="orig.gguf")
    assert out == (tmp_path / "conv").absolute()
    assert is_converted_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no .tmp left behind
    assert {p.name for p in out.iterdir()} >= {MARKER, "tokenizer.json",
                                               "tokenizer_settings.json", "params"}
    info = json.loads((out / MARKER).read_text())
    assert info["format"] == 1 and info["dtype"] == "float32" and info["source"] == "orig.gguf"

    config2, params2, tok2 = load_converted(out)
    assert config2 == config
    assert isinstance(config2.rope_scaling.freq_factors, tuple)
    _tree_equal(params2, params)
    _same_tokenizer(tok2, tok)
    assert tok2.stop_token_ids == tok.stop_token_ids == tuple(sorted({7, tok.eos_token_id}))


def test_dtypes(tmp_path, tiny):
    config, params, tok = tiny
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out = save_converted(tmp_path / "conv", config, bf16, tok, jnp.bfloat16)
    assert json.loads((out / MARKER).read_text())["dtype"] == "bfloat16"
    _, restored, _ = load_converted(out)  # dtype None: as saved
    _tree_equal(restored, bf16)
    _, as_f32, _ = load_converted(out, jnp.float32)  # cast after restore
    _tree_equal(as_f32, bf16, dtype=jnp.float32)


def test_save_replaces_existing(tmp_path, tiny):
    config, params, tok = tiny
    target = tmp_path / "conv"
    save_converted(target, config, params, tok, jnp.float32)
    doubled = jax.tree.map(lambda x: x * 2, params)
    save_converted(target, config, doubled, tok, jnp.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]
    _tree_equal(load_converted(target)[1], doubled)


def test_load_converted_errors(tmp_path, tiny):
    config, params, tok = tiny
    with pytest.raises(ModelLoadError, match=r"nothing.*not a readable converted model"):
        load_converted(tmp_path / "nothing")
    out = save_converted(tmp_path / "conv", config, params, tok, jnp.float32)
    info = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps(dict(info, format=99)))
    with pytest.raises(ModelLoadError, match=r"conv: converted-model format 99 is not 1"):
        load_converted(out)
    (out / MARKER).write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"conv: not a readable converted model"):
        load_converted(out)
    (out / MARKER).write_text(json.dumps(info))
    for f in (out / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=r"conv/params: cannot restore orbax checkpoint"):
        load_converted(out)


# -- load_model's conversion cache ------------------------------------------------------------

def _write_hf_dir(root, config, params):
    """A minimal Hugging Face directory holding `params`."""
    root.mkdir()
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params["params"])
    tensors = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"],
               "model.norm.weight": p["norm"]["weight"],
               "lm_head.weight": np.ascontiguousarray(p["lm_head"]["kernel"].T)}
    names = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
             "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
             "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
    for i in range(config.num_layers):
        for ours, theirs in names.items():
            tensors[f"model.layers.{i}.{theirs}.weight"] = np.ascontiguousarray(
                p["layers"][ours]["kernel"][i].T)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = p["layers"][norm]["weight"][i]
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "_name_or_path": config.name,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": False}))
    (root / "tokenizer.json").write_text(Tokenizer.byte_level(config.vocab_size).backend.to_str())
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": "{{ 1 }}"}))
    return root


@pytest.fixture
def hf_source(tmp_path, tiny):
    config, params, _ = tiny
    config = dataclasses.replace(config, rope_scaling=None)
    return config, params, _write_hf_dir(tmp_path / "hf-model", config, params)


def _forbid_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again instead of loading from the cache")
    monkeypatch.setattr(hf_dir_module, "load_hf_dir", fail)


def test_cache_converts_once(tmp_path, hf_source, monkeypatch):
    config, params, src = hf_source
    cache = tmp_path / "cache"
    first = load_model(str(src), cache_dir=cache)
    assert first.config == config and first.source == str(src)
    _tree_equal(first.params, params)

    entries = [p for p in cache.iterdir()]
    assert len(entries) == 1 and entries[0].name.startswith("hf-model-")
    entry = entries[0]
    assert (entry / MARKER).is_file() and (entry / "params").is_dir()
    assert json.loads((entry / MARKER).read_text())["source"] == str(src)

    _forbid_conversion(monkeypatch)
    second = load_model(str(src), cache_dir=cache)
    assert second.config == config and second.source == str(src)
    _tree_equal(second.params, params)
    _same_tokenizer(second.tokenizer, first.tokenizer)
    assert [p.name for p in cache.iterdir()] == [entry.name]

    # a converted directory is itself a model source
    direct = load_model(str(entry))
    assert direct.config == config and direct.source == str(entry)
    _tree_equal(direct.params, params)
    _same_tokenizer(direct.tokenizer, first.tokenizer)
    as_bf16 = load_model(str(entry), "bfloat16")
    _tree_equal(as_bf16.params, params, dtype=jnp.bfloat16)


def test_cache_key_has_dtype_and_default_dir(tmp_path, hf_source, monkeypatch):
    config, params, src = hf_source
    monkeypatch.setenv("PENSIEVE_JAX_CACHE", str(tmp_path / "env-cache"))
    bf16 = load_model(str(src), "bfloat16")  # cache_dir None: the default (env) directory
    _tree_equal(bf16.params, params, dtype=jnp.bfloat16)
    entries = list((tmp_path / "env-cache").iterdir())
    assert len(entries) == 1 and json.loads((entries[0] / MARKER).read_text())["dtype"] == \
        "bfloat16"
    # float32 is another cache entry, not a cast of the bfloat16 one
    f32 = load_model(str(src))
    _tree_equal(f32.params, params)
    assert len(list((tmp_path / "env-cache").iterdir())) == 2


def test_cache_disabled(tmp_path, hf_source, monkeypatch):
    config, params, src = hf_source
    monkeypatch.setenv("PENSIEVE_JAX_CACHE", str(tmp_path / "env-cache"))
    _tree_equal(load_model(str(src), cache_dir=False).params, params)
    assert not (tmp_path / "env-cache").exists()


def test_cache_sees_weights_rewritten_in_place(tmp_path, hf_source):
    config, params, src = hf_source
    cache = tmp_path / "cache"
    load_model(str(src), cache_dir=cache)
    doubled = jax.tree.map(lambda x: x * 2, params)
    other = _write_hf_dir(tmp_path / "other", config, doubled)
    before = os.stat(src).st_mtime_ns
    (src / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    assert os.stat(src).st_mtime_ns == before  # the directory itself did not change
    _tree_equal(load_model(str(src), cache_dir=cache).params, doubled)
