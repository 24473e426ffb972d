"""Hugging Face directories: config.json + *.safetensors (HF names, [out, in], q/k NOT permuted)
+ tokenizer.json / tokenizer_config.json, loaded with load_model and compared exactly."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from pensieve_jax.model.attention import AttentionBatch, init_kv_cache
from pensieve_jax.model.config import PRESETS, ModelConfig, RopeScaling
from pensieve_jax.model.llama import Llama, param_shapes
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights import load_model
from pensieve_jax.weights.assemble import ModelLoadError

CFG = dataclasses.replace(PRESETS["tiny"], name="org/tiny-llama", rms_norm_eps=1e-6,
                          rope_theta=500000.0)
LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
           "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
           "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
NORMS = ("input_layernorm", "post_attention_layernorm")
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def hf_config(config: ModelConfig, **over) -> dict:
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "_name_or_path": config.name, "vocab_size": config.vocab_size,
         "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
         "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
         "num_key_value_heads": config.num_kv_heads, "rms_norm_eps": config.rms_norm_eps,
         "rope_theta": config.rope_theta, "rope_scaling": None,
         "max_position_embeddings": config.max_position_embeddings,
         "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": "silu",
         "torch_dtype": "float32"}
    d.update(over)
    return d


def hf_tensors(config: ModelConfig, params) -> dict[str, np.ndarray]:
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params["params"])
    out = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"],
           "model.norm.weight": p["norm"]["weight"]}
    if "lm_head" in p:
        out["lm_head.weight"] = np.ascontiguousarray(p["lm_head"]["kernel"].T)
    for i in range(config.num_layers):
        for ours, theirs in LINEARS.items():
            out[f"model.layers.{i}.{theirs}.weight"] = np.ascontiguousarray(
                p["layers"][ours]["kernel"][i].T)
        for norm in NORMS:
            out[f"model.layers.{i}.{norm}.weight"] = p["layers"][norm]["weight"][i]
    return out


def write_hf_dir(root, config: ModelConfig, tensors: dict[str, np.ndarray], shards: int = 1,
                 config_over: dict | None = None, tokenizer: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(hf_config(config, **(config_over or {}))))
    names = sorted(tensors)
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(root / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    if tokenizer:
        tok = Tokenizer.byte_level(config.vocab_size)
        (root / "tokenizer.json").write_text(tok.backend.to_str())
        (root / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
             "add_bos_token": True, "chat_template": TEMPLATE}))
        (root / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [tok.backend.token_to_id("<|endoftext|>")]}))
    return root


def assert_trees_equal(got, want):
    got_flat = jax.tree_util.tree_flatten_with_path(got)[0]
    want_flat = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [jax.tree_util.keystr(p) for p, _ in got_flat] == \
        [jax.tree_util.keystr(p) for p, _ in want_flat]
    for (path, g), (_, w) in zip(got_flat, want_flat):
        assert g.shape == w.shape and g.dtype == w.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                      err_msg=jax.tree_util.keystr(path))


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
    params = _random_params(CFG, seed=3)
    return CFG, params, hf_tensors(CFG, params)


def test_round_trip_exact(tmp_path, tiny):
    config, params, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors)
    loaded = load_model(str(root), cache_dir=False)
    assert loaded.config == config
    assert loaded.source == str(root)
    assert_trees_equal(loaded.params, params)

    # the weights work as a model: one forward on the loaded tree equals one on the originals
    model = Llama(config)
    kv = init_kv_cache(config.num_layers, 2, 4, config.num_kv_heads, config.head_dim)
    batch = AttentionBatch(jnp.array([[0, 1]], jnp.int32), jnp.array([6], jnp.int32),
                           jnp.array([0, 6], jnp.int32))
    ids, pos = jnp.array([5, 300, 17, 42, 99, 1], jnp.int32), jnp.arange(6, dtype=jnp.int32)
    run = jax.jit(lambda p: model.apply(p, ids, pos, kv, batch)[0])
    np.testing.assert_allclose(np.asarray(run(loaded.params)), np.asarray(run(params)),
                               rtol=1e-6, atol=1e-6)


def test_tokenizer_files(tmp_path, tiny):
    config, _, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors)
    tok = load_model(str(root), cache_dir=False).tokenizer
    ref = Tokenizer.byte_level(config.vocab_size)
    backend = ref.backend
    assert tok.bos_token_id == backend.token_to_id("<|im_start|>")
    assert tok.eos_token_id == backend.token_to_id("<|im_end|>")
    assert tok.stop_token_ids == tuple(sorted({backend.token_to_id("<|endoftext|>"),
                                               backend.token_to_id("<|im_end|>")}))
    assert tok.add_bos_token is True and tok.chat_template == TEMPLATE
    text = "héllo <|im_end|> wörld"
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode(text, add_special_tokens=True) == [tok.bos_token_id] + ref.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_sharded_safetensors(tmp_path, tiny):
    config, params, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors, shards=3)
    assert len(list(root.glob("*.safetensors"))) == 3
    assert_trees_equal(load_model(str(root), cache_dir=False).params, params)


def test_tied_embeddings(tmp_path, tiny):
    config, params, tensors = tiny
    tied_cfg = dataclasses.replace(config, tie_word_embeddings=True)
    tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    root = write_hf_dir(tmp_path / "model", tied_cfg, tensors)
    loaded = load_model(str(root), cache_dir=False)
    assert loaded.config == tied_cfg and loaded.config.tie_word_embeddings is True
    assert "lm_head" not in loaded.params["params"]
    assert_trees_equal(loaded.params,
                       {"params": {k: v for k, v in params["params"].items() if k != "lm_head"}})


def test_untied_without_lm_head_is_an_error(tmp_path, tiny):
    config, _, tensors = tiny
    tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    root = write_hf_dir(tmp_path / "model", config, tensors)
    with pytest.raises(ModelLoadError, match=r"model.*lack tensor lm_head\.weight"):
        load_model(str(root), cache_dir=False)


def test_bfloat16_load(tmp_path, tiny):
    config, params, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors)
    loaded = load_model(str(root), "bfloat16", cache_dir=False)
    want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    assert_trees_equal(loaded.params, want)


def test_bfloat16_safetensors(tmp_path, tiny):
    """Checkpoints stored in bf16 (the usual case) load exactly, as float32 or bfloat16."""
    config, params, tensors = tiny
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    root = write_hf_dir(tmp_path / "model", config, bf16, config_over={"torch_dtype": "bfloat16"})
    want32 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
    assert_trees_equal(load_model(str(root), cache_dir=False).params, want32)
    want16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    assert_trees_equal(load_model(str(root), "bfloat16", cache_dir=False).params, want16)


def test_rope_scaling_llama3(tmp_path, tiny):
    config, _, tensors = tiny
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    root = write_hf_dir(tmp_path / "model", config, tensors, config_over={"rope_scaling": rope})
    loaded = load_model(str(root), cache_dir=False)
    assert loaded.config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert loaded.config == dataclasses.replace(config, rope_scaling=loaded.config.rope_scaling)


@pytest.mark.parametrize("rope,want", [
    ({"type": "linear", "factor": 2.0}, RopeScaling("linear", 2.0)),
    ({"rope_type": "default"}, None),
])
def test_rope_scaling_other(tmp_path, tiny, rope, want):
    config, _, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors, config_over={"rope_scaling": rope})
    assert load_model(str(root), cache_dir=False).config.rope_scaling == want


def test_head_dim_and_kv_heads_defaults(tmp_path):
    """No num_key_value_heads -> MHA; explicit head_dim wins over hidden / heads."""
    config = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_dim=24, name="odd")
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          param_shapes(config))
    over = {"head_dim": 24}
    root = tmp_path / "model"
    write_hf_dir(root, config, hf_tensors(config, params), config_over=over)
    cfg = json.loads((root / "config.json").read_text())
    del cfg["num_key_value_heads"]
    (root / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(root), cache_dir=False)
    assert loaded.config == config
    assert_trees_equal(loaded.params, params)


# -- errors ---------------------------------------------------------------------------------------

def test_missing_safetensors(tmp_path, tiny):
    config, _, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors)
    for f in root.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match=r"model.*no \*\.safetensors weight files"):
        load_model(str(root), cache_dir=False)


def test_missing_tokenizer_json(tmp_path, tiny):
    config, _, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors, tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"model.*missing tokenizer\.json"):
        load_model(str(root), cache_dir=False)


def test_unsupported_architecture(tmp_path, tiny):
    config, _, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors,
                        config_over={"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ModelLoadError, match=r"config\.json.*unsupported architecture.*GPT2LMHead"):
        load_model(str(root), cache_dir=False)


def test_unsupported_rope_scaling(tmp_path, tiny):
    config, _, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors,
                        config_over={"rope_scaling": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(ModelLoadError, match=r"config\.json.*unsupported rope type 'longrope' "
                                             r"in rope_scaling \(supported: default, .*yarn"):
        load_model(str(root), cache_dir=False)


def test_config_missing_key_and_bad_json(tmp_path, tiny):
    config, _, tensors = tiny
    root = write_hf_dir(tmp_path / "model", config, tensors)
    cfg = json.loads((root / "config.json").read_text())
    del cfg["hidden_size"]
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json.*hidden_size"):
        load_model(str(root), cache_dir=False)
    (root / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: invalid JSON"):
        load_model(str(root), cache_dir=False)


def test_wrong_tensor_shape(tmp_path, tiny):
    config, _, tensors = tiny
    tensors = dict(tensors)
    tensors["model.embed_tokens.weight"] = np.zeros((config.vocab_size, 32), np.float32)
    root = write_hf_dir(tmp_path / "model", config, tensors)
    with pytest.raises(ModelLoadError, match=r"embed_tokens has shape \(512, 32\), expected "
                                             r"\(512, 64\)"):
        load_model(str(root), cache_dir=False)


def test_missing_layer_tensor(tmp_path, tiny):
    config, _, tensors = tiny
    tensors = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.v_proj.weight"}
    root = write_hf_dir(tmp_path / "model", config, tensors)
    with pytest.raises(ModelLoadError, match=r"lack tensor model\.layers\.1\.self_attn\.v_proj"):
        load_model(str(root), cache_dir=False)
