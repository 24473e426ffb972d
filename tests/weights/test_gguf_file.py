"""GGUF loading: files written with gguf.GGUFWriter the way llama.cpp's converter writes them
(llama.cpp tensor names, torch [out, in] layout, q/k rows permuted for interleaved RoPE), read back
with load_model and compared with the weights that went in, tensor by tensor and through the model.
"""

from __future__ import annotations

import dataclasses
import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from pensieve_jax.model.attention import AttentionBatch, init_kv_cache
from pensieve_jax.model.config import PRESETS, ModelConfig, RopeScaling
from pensieve_jax.model.llama import Llama, param_shapes
from pensieve_jax.weights import load_model
from pensieve_jax.weights.assemble import ModelLoadError, random_params
from pensieve_jax.weights.gguf_file import (SUPPORTED_TYPES, config_from_metadata, dequantize,
                                            permute_rope_rows, unpermute_rope_rows)

Q = gguf.GGMLQuantizationType

# Every input dimension (hidden 64, intermediate 128) is a multiple of the 32-wide blocks.
CFG = dataclasses.replace(PRESETS["tiny"], name="tiny-gguf")
# Every input dimension is a multiple of the 256-wide K-quant super-blocks.
CFG_K = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=500000.0,
                    max_position_embeddings=1024, rms_norm_eps=1e-6, name="tiny-gguf-k")

LINEARS = {  # our leaf -> (Hugging Face module, llama.cpp tensor)
    "q_proj": ("self_attn.q_proj", "attn_q"), "k_proj": ("self_attn.k_proj", "attn_k"),
    "v_proj": ("self_attn.v_proj", "attn_v"), "o_proj": ("self_attn.o_proj", "attn_output"),
    "gate_proj": ("mlp.gate_proj", "ffn_gate"), "up_proj": ("mlp.up_proj", "ffn_up"),
    "down_proj": ("mlp.down_proj", "ffn_down"),
}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
MERGED = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# -- references written independently of the code under test ---------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama_cpp_permute, by tracking where each row went."""
    src = llama_cpp_permute(np.arange(w.shape[0]), n_head)  # GGUF row i holds HF row src[i]
    out = np.empty_like(w)
    out[src] = w
    return out


def hf_tensors(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """Our parameter tree -> Hugging Face names, [out, in] float32 numpy."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params["params"])
    out = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"],
           "model.norm.weight": p["norm"]["weight"]}
    if "lm_head" in p:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    for i in range(config.num_layers):
        for ours, (theirs, _) in LINEARS.items():
            out[f"model.layers.{i}.{theirs}.weight"] = p["layers"][ours]["kernel"][i].T
        for norm in NORMS:
            out[f"model.layers.{i}.{norm}.weight"] = p["layers"][norm]["weight"][i]
    return out


def tree_from_hf(config: ModelConfig, hf: dict[str, np.ndarray]):
    """Hugging Face tensors -> our parameter tree (numpy)."""
    layers = {}
    for ours, (theirs, _) in LINEARS.items():
        layers[ours] = {"kernel": np.stack([hf[f"model.layers.{i}.{theirs}.weight"].T
                                            for i in range(config.num_layers)])}
    for norm in NORMS:
        layers[norm] = {"weight": np.stack([hf[f"model.layers.{i}.{norm}.weight"]
                                            for i in range(config.num_layers)])}
    params = {"embed_tokens": {"embedding": hf["model.embed_tokens.weight"]}, "layers": layers,
              "norm": {"weight": hf["model.norm.weight"]}}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": hf["lm_head.weight"].T}
    return {"params": params}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.rsplit(".", 1)[0]
    table = {theirs: cpp for theirs, cpp in LINEARS.values()} | NORMS
    return f"blk.{layer}.{table[module]}.weight"


def gpt2_vocab(vocab_size: int) -> tuple[list[str], list[int]]:
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + MERGED + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    tokens += [f"<|reserved_{i}|>" for i in range(len(tokens), vocab_size)]
    types += [1] * (vocab_size - len(types))
    return tokens, types


# K-quant block layouts: (bytes per 256-value block, offsets of the f16 d / dmin fields, d scale)
K_BLOCKS = {Q.Q2_K: (84, (80, 82), 1e-3), Q.Q3_K: (110, (108,), 1e-3),
            Q.Q4_K: (144, (0, 2), 1e-4), Q.Q5_K: (176, (0, 2), 1e-4), Q.Q6_K: (210, (208,), 1e-5)}


def random_k_blocks(rng: np.random.Generator, rows: int, cols: int, qtype) -> np.ndarray:
    """Valid raw K-quant data [rows, cols/256*block_bytes]: random bits, finite small scales."""
    nbytes, d_offsets, scale = K_BLOCKS[qtype]
    assert gguf.GGML_QUANT_SIZES[qtype] == (256, nbytes)
    blocks = rng.integers(0, 256, (rows * cols // 256, nbytes), dtype=np.uint8)
    for off in d_offsets:
        d = (rng.uniform(0.5, 1.0, blocks.shape[0]) * scale).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


# -- writing GGUF files ---------------------------------------------------------------------------

def write_gguf(path, config: ModelConfig, hf: dict[str, np.ndarray], qtype_of=lambda name: Q.F32,
               *, arch: str = "llama", rope_freqs: np.ndarray | None = None, raw=None,
               skip=(), metadata=True, tokenizer=True) -> dict[str, np.ndarray]:
    """Write `hf` (Hugging Face names, [out, in]) as llama.cpp would.

    qtype_of(gguf_name) picks each tensor's storage type; raw maps a GGUF name to (bytes, type)
    stored as is. Returns what the file holds, dequantized, by Hugging Face name and in Hugging
    Face row order: the weights a correct loader must produce.
    """
    w = gguf.GGUFWriter(str(path), arch)
    if metadata:
        w.add_name(config.name)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_heads)
        w.add_head_count_kv(config.num_kv_heads)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_rope_freq_base(config.rope_theta)
        w.add_rope_dimension_count(config.head_dim)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(1)
    if tokenizer:
        tokens, types = gpt2_vocab(config.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(MERGES)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_chat_template(CHAT_TEMPLATE)
    stored = {}
    for hf_name, value in hf.items():
        name = gguf_name(hf_name)
        if name in skip:
            continue
        if name.endswith("attn_q.weight"):
            value = permute_rope_rows(value, config.num_heads)
        elif name.endswith("attn_k.weight"):
            value = permute_rope_rows(value, config.num_kv_heads)
        if raw is not None and name in raw:
            data, qtype = raw[name]
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            qtype = Q.F32 if value.ndim == 1 else qtype_of(name)
            data = gguf.quants.quantize(np.ascontiguousarray(value, np.float32), qtype)
            if qtype in (Q.F32, Q.F16):
                w.add_tensor(name, data)
            else:
                w.add_tensor(name, data, raw_dtype=qtype)
        back = gguf.quants.dequantize(data, qtype).reshape(value.shape).astype(np.float32)
        if name.endswith("attn_q.weight"):
            back = llama_cpp_unpermute(back, config.num_heads)
        elif name.endswith("attn_k.weight"):
            back = llama_cpp_unpermute(back, config.num_kv_heads)
        stored[hf_name] = back
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


# -- running the model --------------------------------------------------------------------------

PROMPT = np.array([3, 141, 59, 26, 5, 358, 97, 93], np.int32)


@functools.lru_cache(maxsize=None)
def _forward(config: ModelConfig):
    model = Llama(config)
    t = len(PROMPT)
    batch = AttentionBatch(jnp.array([[0, 1]], jnp.int32), jnp.array([t], jnp.int32),
                           jnp.array([0, t], jnp.int32))

    @jax.jit
    def run(params):
        kv = init_kv_cache(config.num_layers, 2, 4, config.num_kv_heads, config.head_dim)
        return model.apply(params, jnp.asarray(PROMPT), jnp.arange(t, dtype=jnp.int32), kv,
                           batch)[0]
    return run


def logits(config: ModelConfig, params) -> np.ndarray:
    return np.asarray(_forward(config)(jax.tree.map(jnp.asarray, params)))


def assert_config(got: ModelConfig, want: ModelConfig):
    """Equal, except that GGUF stores rms_norm_eps as float32 (1e-5 reads back 9.9999997e-06)."""
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-7)
    assert np.float32(got.rms_norm_eps) == np.float32(want.rms_norm_eps)
    assert dataclasses.replace(got, rms_norm_eps=want.rms_norm_eps) == want


def assert_trees_equal(got, want, rtol=0.0, atol=0.0):
    got_flat = jax.tree_util.tree_flatten_with_path(got)[0]
    want_flat = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [jax.tree_util.keystr(p) for p, _ in got_flat] == \
        [jax.tree_util.keystr(p) for p, _ in want_flat]
    for (path, g), (_, w) in zip(got_flat, want_flat):
        assert g.shape == w.shape, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def tiny():
    """(config, random params as numpy, Hugging Face tensors)."""
    params = jax.tree.map(np.asarray, random_params(CFG, jnp.float32, seed=1))
    return CFG, params, hf_tensors(CFG, params)


# -- the permutation ----------------------------------------------------------------------------

@pytest.mark.parametrize("rows,n_head", [(64, 4), (32, 2), (16, 1), (48, 3)])
def test_rope_permutation_matches_llama_cpp_and_inverts(rows, n_head):
    rng = np.random.default_rng(rows + n_head)
    w = rng.standard_normal((rows, 5)).astype(np.float32)
    np.testing.assert_array_equal(permute_rope_rows(w, n_head), llama_cpp_permute(w, n_head))
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, n_head), n_head), w)
    np.testing.assert_array_equal(permute_rope_rows(unpermute_rope_rows(w, n_head), n_head), w)
    np.testing.assert_array_equal(unpermute_rope_rows(w, n_head), llama_cpp_unpermute(w, n_head))
    assert not np.array_equal(permute_rope_rows(w, n_head), w)  # it does move rows
    # 1-D (a bias-shaped vector) works too
    v = np.arange(rows, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(v, n_head), n_head), v)


# -- full-model round trips -----------------------------------------------------------------------

def test_f32_round_trip_is_exact(tmp_path, tiny):
    config, params, hf = tiny
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, hf)
    loaded = load_model(str(path), cache_dir=False)

    assert_config(loaded.config, config)
    assert loaded.source == str(path)
    assert_trees_equal(loaded.params, params)
    assert jax.tree.leaves(loaded.params)[0].dtype == jnp.float32
    shapes = param_shapes(config)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), loaded.params) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), shapes)
    np.testing.assert_allclose(logits(config, loaded.params), logits(config, params),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1],
                         ids=lambda q: q.name)
def test_quantized_round_trip(tmp_path, tiny, qtype):
    config, params, hf = tiny
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_gguf(path, config, hf, lambda name: qtype)
    loaded = load_model(str(path), cache_dir=False)
    assert_config(loaded.config, config)

    want = tree_from_hf(config, stored)  # dequantize(quantize(w)) in our layout
    assert_trees_equal(loaded.params, want, rtol=1e-6, atol=1e-7)
    # quantization really happened, and stayed near the original weights
    q_kernel = np.asarray(loaded.params["params"]["layers"]["q_proj"]["kernel"])
    orig = params["params"]["layers"]["q_proj"]["kernel"]
    assert not np.array_equal(q_kernel, orig)
    tol = {Q.F16: 1e-4, Q.BF16: 1e-3, Q.Q8_0: 2e-3}.get(qtype, 2e-2)
    np.testing.assert_allclose(q_kernel, orig, atol=tol)
    # norms stay F32, like llama.cpp writes them
    assert_trees_equal(loaded.params["params"]["norm"], params["params"]["norm"])

    np.testing.assert_allclose(logits(config, loaded.params), logits(config, want),
                               rtol=1e-5, atol=1e-5)


def test_mixed_k_quant_round_trip(tmp_path):
    """Q4_K_M-like file: Q4_K and Q6_K tensors of random (valid) blocks."""
    rng = np.random.default_rng(7)
    config = CFG_K
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.02).astype(np.float32),
                          param_shapes(config))
    hf = hf_tensors(config, params)
    raw = {}
    for hf_name, value in hf.items():
        name = gguf_name(hf_name)
        if value.ndim == 2:
            qtype = Q.Q6_K if any(k in name for k in ("attn_v", "ffn_down", "output.")) else Q.Q4_K
            raw[name] = (random_k_blocks(rng, *value.shape, qtype), qtype)
    path = tmp_path / "tiny-k.gguf"
    stored = write_gguf(path, config, hf, raw=raw)
    loaded = load_model(str(path), cache_dir=False)
    assert_config(loaded.config, config)

    want = tree_from_hf(config, stored)
    assert_trees_equal(loaded.params, want)
    for leaf in jax.tree.leaves(loaded.params):
        assert np.isfinite(np.asarray(leaf)).all()
    np.testing.assert_allclose(logits(config, loaded.params), logits(config, want),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_load(tmp_path, tiny):
    config, params, hf = tiny
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, hf, lambda name: Q.F16)
    loaded = load_model(str(path), "bfloat16", cache_dir=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    want = jax.tree.map(lambda x: np.asarray(x, np.float16).astype(jnp.bfloat16), params)
    assert_trees_equal(loaded.params, want)


def test_tied_embeddings(tmp_path, tiny):
    config, params, hf = tiny
    path = tmp_path / "tied.gguf"
    write_gguf(path, config, hf, skip=("output.weight",))
    loaded = load_model(str(path), cache_dir=False)
    assert loaded.config.tie_word_embeddings is True
    assert_config(loaded.config, dataclasses.replace(config, tie_word_embeddings=True))
    assert "lm_head" not in loaded.params["params"]
    tied = {"params": {k: v for k, v in params["params"].items() if k != "lm_head"}}
    assert_trees_equal(loaded.params, tied)
    # the output projection is the embedding matrix: same logits as an untied model whose
    # lm_head is the transposed embedding
    untied = dict(tied["params"], lm_head={"kernel": params["params"]["embed_tokens"]["embedding"].T})
    np.testing.assert_allclose(logits(loaded.config, loaded.params),
                               logits(config, {"params": untied}), rtol=1e-5, atol=1e-5)


def test_rope_freqs_tensor_gives_freq_factors(tmp_path, tiny):
    config, params, hf = tiny
    factors = np.array([1, 1, 1, 2, 4, 8, 8, 8], np.float32)  # head_dim // 2 entries
    path = tmp_path / "rope.gguf"
    write_gguf(path, config, hf, rope_freqs=factors)
    loaded = load_model(str(path), cache_dir=False)
    scaling = loaded.config.rope_scaling
    assert scaling == RopeScaling("freq_factors", freq_factors=tuple(factors.tolist()))
    assert_config(loaded.config, dataclasses.replace(config, rope_scaling=scaling))
    plain = config.rope_inv_freq()
    np.testing.assert_allclose(loaded.config.rope_inv_freq(), plain / factors, rtol=1e-6)
    # rope_freqs is metadata for the config, not a parameter
    assert_trees_equal(loaded.params, params)
    scaled_logits = logits(loaded.config, loaded.params)
    assert not np.allclose(scaled_logits, logits(config, params), rtol=0, atol=1e-7)


def test_tokenizer_from_gguf_metadata(tmp_path, tiny):
    config, _, hf = tiny
    path = tmp_path / "tok.gguf"
    write_gguf(path, config, hf)
    tok = load_model(str(path), cache_dir=False).tokenizer
    tokens, _ = gpt2_vocab(config.vocab_size)
    assert tok.vocab_size == config.vocab_size
    assert tok.bos_token_id == tokens.index("<|im_start|>")
    assert tok.eos_token_id == tokens.index("<|im_end|>")
    assert tok.eos_token_id in tok.stop_token_ids
    assert tok.chat_template == CHAT_TEMPLATE
    ids = tok.encode("hello world<|im_end|>")
    assert ids == [tokens.index("hello"), tokens.index("Ġworld"), tokens.index("<|im_end|>")]
    assert tok.decode(ids) == "hello world<|im_end|>"
    assert tok.encode("é") == [tokens.index(c) for c in "Ã©"]  # byte-level: two bytes
    rendered = tok.render_chat([{"role": "user", "content": "hello"}])
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


# -- dequantization, tensor by tensor ------------------------------------------------------------

@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 3, 512
    if qtype in K_BLOCKS:
        data = random_k_blocks(rng, rows, cols, qtype)
    else:
        data = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    path = tmp_path / "one.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    if qtype in (Q.F32, Q.F16):
        w.add_tensor("t.weight", data)
    else:
        w.add_tensor("t.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    assert tensor.tensor_type == qtype
    got = dequantize(tensor, str(path))
    assert got.shape == (rows, cols) and got.dtype == np.float32
    want = gguf.quants.dequantize(data, qtype).reshape(rows, cols)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()


# -- metadata -> config ---------------------------------------------------------------------------

def _meta(**over):
    meta = {"general.architecture": "llama", "llama.embedding_length": 64,
            "llama.attention.head_count": 4, "llama.feed_forward_length": 128,
            "llama.block_count": 2, "tokenizer.ggml.tokens": ["a"] * 100}
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def test_config_from_metadata_defaults_and_overrides():
    c = config_from_metadata(_meta(), {"output.weight"}, "m.gguf")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (100, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 4, 16)
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-5, 10000.0, 4096)
    assert c.tie_word_embeddings is False and c.rope_scaling is None and c.name == "m.gguf"

    c = config_from_metadata(_meta(**{"llama.attention.key_length": 32,
                                      "llama.attention.head_count_kv": 2,
                                      "llama.rope.scaling.type": "linear",
                                      "llama.rope.scaling.factor": 4.0,
                                      "general.architecture": "mistral",
                                      "mistral.embedding_length": 64,
                                      "mistral.attention.head_count": 4,
                                      "mistral.feed_forward_length": 128,
                                      "mistral.block_count": 2,
                                      "mistral.attention.key_length": 32,
                                      "mistral.attention.head_count_kv": 2,
                                      "mistral.rope.scaling.type": "linear",
                                      "mistral.rope.scaling.factor": 4.0,
                                      "mistral.vocab_size": 77, "general.name": "m"}),
                             set(), "m.gguf")
    assert (c.head_dim, c.num_kv_heads, c.vocab_size, c.name) == (32, 2, 77, "m")
    assert c.rope_scaling == RopeScaling("linear", 4.0)
    assert c.tie_word_embeddings is True


def test_config_from_metadata_errors():
    with pytest.raises(ModelLoadError, match=r"m\.gguf.*llama\.block_count"):
        config_from_metadata(_meta(**{"llama.block_count": None}), set(), "m.gguf")
    with pytest.raises(ModelLoadError, match="unsupported rope scaling 'longrope'"):
        config_from_metadata(_meta(**{"llama.rope.scaling.type": "longrope"}), set(), "m.gguf")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gemma'.*qwen3"):
        config_from_metadata(_meta(**{"general.architecture": "gemma"}), set(), "m.gguf")


# -- errors ---------------------------------------------------------------------------------------

def test_bad_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(200))
    with pytest.raises(ModelLoadError, match=r"model\.gguf.*not a GGUF file \(bad magic\)"):
        load_model(str(path), cache_dir=False)


def test_garbage_after_magic(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match=r"malformed GGUF file .*garbage\.gguf"):
        load_model(str(path), cache_dir=False)


def test_truncated_file(tmp_path, tiny):
    config, _, hf = tiny
    path = tmp_path / "cut.gguf"
    write_gguf(path, config, hf)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"malformed GGUF file .*cut\.gguf"):
        load_model(str(path), cache_dir=False)


def test_unsupported_quantization(tmp_path, tiny):
    config, _, hf = tiny
    path = tmp_path / "iq.gguf"
    rng = np.random.default_rng(3)
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    assert Q.IQ4_NL not in SUPPORTED_TYPES and block_size == 32
    blocks = rng.integers(0, 256, (64, 64 // block_size, type_size), dtype=np.uint8)
    blocks[..., :2] = np.full(blocks.shape[:2], 1e-3, np.float16).view(np.uint8).reshape(
        *blocks.shape[:2], 2)
    write_gguf(path, config, hf, raw={"blk.0.attn_q.weight": (blocks.reshape(64, -1), Q.IQ4_NL)})
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path), cache_dir=False)
    msg = str(e.value)
    assert "iq.gguf" in msg and "blk.0.attn_q.weight" in msg and "IQ4_NL" in msg
    assert "unsupported quantization" in msg and "Q4_K" in msg  # lists what is supported


def test_unsupported_architecture(tmp_path, tiny):
    config, _, hf = tiny
    path = tmp_path / "gemma.gguf"
    write_gguf(path, config, hf, arch="gemma", metadata=False)
    with pytest.raises(ModelLoadError, match=r"gemma\.gguf.*unsupported GGUF architecture 'gemma'"):
        load_model(str(path), cache_dir=False)


def test_missing_tensor(tmp_path, tiny):
    config, _, hf = tiny
    path = tmp_path / "hole.gguf"
    write_gguf(path, config, hf, skip=("blk.1.ffn_down.weight",))
    with pytest.raises(ModelLoadError, match=r"hole\.gguf.*lacks tensor blk\.1\.ffn_down\.weight"):
        load_model(str(path), cache_dir=False)


def test_tensor_shape_mismatch(tmp_path, tiny):
    config, _, hf = tiny
    path = tmp_path / "shape.gguf"
    hf = dict(hf)
    for i in range(config.num_layers):  # an up projection one block too wide
        hf[f"model.layers.{i}.mlp.up_proj.weight"] = np.zeros((160, 64), np.float32)
    write_gguf(path, config, hf)
    with pytest.raises(ModelLoadError, match=r"shape\.gguf.*layers\.up_proj.*\(2, 64, 160\)"):
        load_model(str(path), cache_dir=False)


def test_missing_metadata_key(tmp_path, tiny):
    config, _, hf = tiny
    path = tmp_path / "nometa.gguf"
    write_gguf(path, config, hf, metadata=False)
    with pytest.raises(ModelLoadError, match=r"nometa\.gguf.*GGUF metadata lacks llama\."):
        load_model(str(path), cache_dir=False)


def test_missing_tokenizer_metadata(tmp_path, tiny):
    config, _, hf = tiny
    path = tmp_path / "notok.gguf"
    write_gguf(path, config, hf, tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"notok\.gguf.*tokenizer"):
        load_model(str(path), cache_dir=False)
