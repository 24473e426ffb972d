"""Load a GGUF file of a Llama-style architecture (llama, mistral, qwen2, qwen3): config,
dequantized weights and tokenizer.

Biases (qwen2; llama's optional ones) and Qwen3's q/k norms are taken where the file has their
tensors. llama.cpp stores llama / mistral q and k rows permuted for its interleaved RoPE (undone
here); qwen2 / qwen3 use rotate-half RoPE as Hugging Face does, unpermuted."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from pensieve_jax.model.config import ModelConfig, RopeScaling
from pensieve_jax.tokenizer import Tokenizer, TokenizerError
from pensieve_jax.weights.assemble import ModelLoadError, assemble_params

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
_PERMUTED_ARCHS = ("llama", "mistral")      # q/k rows permuted by llama.cpp's converter
# rope scaling metadata with no counterpart here (refused when present)
_YARN_UNSUPPORTED = ("attn_factor", "yarn_attn_factor", "yarn_ext_factor", "yarn_log_multiplier")

# Hugging Face name (per layer, after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
                 "output_norm.weight", "lm_head.weight": "output.weight"}


def open_gguf(path: str) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # the reader raises ValueError, struct/numpy errors on bad files
        raise ModelLoadError(f"malformed GGUF file {path}: {type(e).__name__}: {e}") from e


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise ModelLoadError(f"malformed GGUF metadata field {key!r}: {e}") from e
    return meta


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], path: str,
                         rope_freqs: np.ndarray | None = None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        moe = meta.get(f"{arch}.expert_count")
        hint = f" (mixture of experts, {moe} experts: not supported)" if moe else ""
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r}{hint} "
                             f"(supported: {', '.join(SUPPORTED_ARCHS)})")

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or
                   meta.get(f"{arch}.rope.dimension_count") or hidden // heads)
    scaling = rope_scaling(meta, arch, path, rope_freqs)
    if meta.get(f"{arch}.attention.sliding_window_pattern") is not None:
        raise ModelLoadError(f"{path}: {arch}.attention.sliding_window_pattern: layer-dependent "
                             "attention is not supported (the same window on every layer, or "
                             "none)")
    window = meta.get(f"{arch}.attention.sliding_window")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    try:
        return ModelConfig(
            vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
            num_heads=heads, num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=scaling,
            max_position_embeddings=int(key("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            name=str(meta.get("general.name", path)),
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            sliding_window=int(window) if window else None)
    except ModelLoadError:
        raise
    except ValueError as e:
        raise ModelLoadError(f"{path}: invalid model config in GGUF metadata: {e}") from e


def rope_scaling(meta: dict[str, Any], arch: str, path: str,
                 rope_freqs: np.ndarray | None) -> RopeScaling | None:
    """The scaling a GGUF file declares: rope_freqs (Llama 3.1), linear or yarn."""
    key = f"{arch}.rope.scaling."
    kind = meta.get(key + "type")
    if rope_freqs is not None:
        return RopeScaling("freq_factors", freq_factors=tuple(rope_freqs.tolist()))
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(meta[key + "factor"]))
    if kind == "yarn":
        extra = [k for k in _YARN_UNSUPPORTED if meta.get(key + k) not in (None, 0.0, 1.0)]
        if extra:
            raise ModelLoadError(f"{path}: {key}{extra[0]} is not supported for yarn scaling")
        original = meta.get(key + "original_context_length") or meta.get(f"{arch}.context_length")
        return RopeScaling("yarn", float(meta[key + "factor"]),
                           original_max_position_embeddings=int(original),
                           beta_fast=float(meta.get(key + "yarn_beta_fast") or 32.0),
                           beta_slow=float(meta.get(key + "yarn_beta_slow") or 1.0))
    raise ModelLoadError(f"{path}: unsupported rope scaling {kind!r} (supported: linear, yarn, "
                         "rope_freqs)")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half halves)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF layout -> GGUF layout); the inverse of `unpermute_rope_rows`."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor, path: str) -> np.ndarray:
    if tensor.tensor_type not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ModelLoadError(f"{path}: tensor {tensor.name} uses unsupported quantization "
                             f"{tensor.tensor_type.name} (supported: {names})")
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, np.float32).reshape(tuple(reversed([int(d) for d in tensor.shape])))


def load_gguf(path: str, dtype) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    reader = open_gguf(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = dequantize(tensors["rope_freqs.weight"], path) if "rope_freqs.weight" in tensors \
        else None
    config = config_from_metadata(meta, set(tensors), path, rope_freqs)
    arch = meta.get("general.architecture")

    def get(hf_name: str) -> np.ndarray:
        if hf_name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[hf_name]
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            name = f"blk.{layer}.{_LAYER_NAMES[rest]}"
        if name not in tensors:
            raise ModelLoadError(f"{path}: GGUF file lacks tensor {name}")
        w = dequantize(tensors[name], path)
        if arch in _PERMUTED_ARCHS and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rope_rows(w, config.num_heads)
        elif arch in _PERMUTED_ARCHS and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rope_rows(w, config.num_kv_heads)
        return w

    params = assemble_params(config, get, dtype, path)
    try:
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    except TokenizerError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    except KeyError as e:
        raise ModelLoadError(f"{path}: GGUF tokenizer metadata lacks {e}") from e
    return config, params, tokenizer
