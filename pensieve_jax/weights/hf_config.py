"""A Hugging Face `config.json` -> ModelConfig, for the families the model runs exactly.

    LlamaForCausalLM    attention_bias (q/k/v/o biases)
    MistralForCausalLM  sliding_window (the same window on every layer)
    Qwen2ForCausalLM    q/k/v biases; sliding window only as one window on every layer
    Qwen3ForCausalLM    per-head q/k RMSNorm; attention_bias; sliding window as Qwen2

RoPE settings are read from either format: top-level `rope_theta` / `rope_scaling` (transformers
4) or `rope_parameters` (transformers 5), with transformers' defaults. Whatever changes the
model's output and is not implemented is refused with a ValueError naming the field and what
is supported (mixture of experts, multimodal towers, quantized weights, other activations,
rope types, partial rotary, layer-dependent windows, ...): a checkpoint is run exactly or not
at all.
"""

from __future__ import annotations

from typing import Any

from pensieve_jax.model.config import ModelConfig
from pensieve_jax.model.rope import RopeScaling, yarn_mscale

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
ACTIVATIONS = ("silu", "swish")
# transformers' defaults per family, for keys a config.json may leave out
_DEFAULTS = {"llama": {"max_position_embeddings": 2048, "head_dim": None},
             "mistral": {"max_position_embeddings": 131072, "head_dim": None},
             "qwen2": {"max_position_embeddings": 32768, "head_dim": None},
             "qwen3": {"max_position_embeddings": 32768, "head_dim": 128}}
_MOE = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_MULTIMODAL = ("vision_config", "audio_config", "text_config", "vision_tower", "mm_tokens_per_image")
_UNSUPPORTED = {    # field -> why, refused when present and not null / false / 0
    "quantization_config": "quantized weights are not supported (load float16/bfloat16/float32 "
                           "safetensors)",
    "attn_logit_softcapping": "attention logit soft-capping is not supported",
    "final_logit_softcapping": "final logit soft-capping is not supported",
    "mlp_bias": "MLP biases are not supported",
}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a config.json dict; ValueError (naming the field) for what the model
    does not implement, KeyError for a missing required key."""
    family = family_of(hf)
    refuse_unsupported(hf)
    defaults = _DEFAULTS[family]
    num_heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    num_layers = hf["num_hidden_layers"]
    max_pos = hf.get("max_position_embeddings") or defaults["max_position_embeddings"]
    theta, scaling = rope_from_hf(hf, max_pos)
    attention_bias = bool(hf.get("attention_bias", False)) and family in ("llama", "qwen3")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or defaults["head_dim"] or hidden // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        name=hf.get("_name_or_path") or next(iter(hf.get("architectures") or []), family),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=attention_bias,
        qk_norm=family == "qwen3",
        sliding_window=sliding_window_from_hf(hf, family, num_layers),
    )


def family_of(hf: dict[str, Any]) -> str:
    """llama / mistral / qwen2 / qwen3, from `architectures` (else `model_type`; a config with
    neither is read as Llama)."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        raise ValueError(f"architectures must be a list, got {archs!r}"[:200])
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    if not archs and (model_type is None or model_type in _DEFAULTS):
        return model_type or "llama"
    what = f"architecture {archs}" if archs else f"model_type {model_type!r}"
    raise ValueError(f"unsupported {what}{_kind_hint(hf)} (supported: "
                     f"{', '.join(ARCHITECTURES)})")


def _kind_hint(hf: dict[str, Any]) -> str:
    for key in _MOE:
        if hf.get(key):
            return f": mixture-of-experts models ({key}={hf[key]!r}) are not supported"
    for key in _MULTIMODAL:
        if hf.get(key):
            return f": multimodal models ({key}) are not supported"
    return ""


def refuse_unsupported(hf: dict[str, Any]) -> None:
    """ValueError for a field that changes the math and is not implemented."""
    hint = _kind_hint(hf)
    if hint:
        raise ValueError(hint[2:] + " (dense text decoders only)")
    for key, why in _UNSUPPORTED.items():
        if hf.get(key):
            raise ValueError(f"{key}: {why}")
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported (supported: "
                         f"{', '.join(ACTIVATIONS)})")


def rope_from_hf(hf: dict[str, Any], max_pos: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` or `rope_theta` + `rope_scaling`, with
    transformers' defaults (theta 10000; yarn / llama3's original_max_position_embeddings
    from the top level, else max_position_embeddings)."""
    params, legacy = hf.get("rope_parameters"), hf.get("rope_scaling")
    for field, d in (("rope_parameters", params), ("rope_scaling", legacy)):
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"{field} must be an object, got {d!r}"[:200])
    if params and any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"rope_parameters per layer type ({', '.join(params)}) are not "
                         "supported (one rope for every layer)")
    kind_of = lambda d: (d or {}).get("rope_type") or (d or {}).get("type") or "default"  # noqa: E731
    if params and legacy and kind_of(params) != kind_of(legacy):
        raise ValueError(f"rope_parameters (rope_type {kind_of(params)!r}) and rope_scaling "
                         f"(rope_type {kind_of(legacy)!r}) disagree")
    field, spec = ("rope_parameters", params) if params else ("rope_scaling", legacy or {})
    theta = float(spec.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor {partial!r} is not supported (rotary over the "
                         "whole head only)")
    kind = kind_of(spec)
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {kind!r} in {field} "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, None
    original = int(hf.get("original_max_position_embeddings") or
                   spec.get("original_max_position_embeddings") or max_pos)
    factor = spec.get("factor")
    if factor is None and kind != "yarn":
        raise ValueError(f"{field}: rope type {kind!r} needs a factor")
    if kind == "linear":
        return theta, RopeScaling("linear", float(factor))
    if kind == "dynamic":
        return theta, RopeScaling("dynamic", float(factor),
                                  original_max_position_embeddings=max_pos)
    if kind == "llama3":
        return theta, RopeScaling("llama3", float(factor), float(spec.get("low_freq_factor", 1.0)),
                                  float(spec.get("high_freq_factor", 4.0)), original)
    factor = float(factor) if factor is not None else max_pos / original
    attention_factor = spec.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = spec.get("mscale"), spec.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    return theta, RopeScaling("yarn", factor, original_max_position_embeddings=original,
                              beta_fast=float(spec.get("beta_fast") or 32),
                              beta_slow=float(spec.get("beta_slow") or 1),
                              truncate=bool(spec.get("truncate", True)),
                              attention_factor=float(attention_factor))


def sliding_window_from_hf(hf: dict[str, Any], family: str, num_layers: int) -> int | None:
    """The window every layer uses, None for none; ValueError where layers differ.

    Mistral: `sliding_window` on every layer. Qwen2 / Qwen3: `sliding_window` applies only with
    `use_sliding_window`, on the layers `layer_types` marks "sliding_attention" (without
    layer_types: layers from `max_window_layers` on), as transformers builds them."""
    window = hf.get("sliding_window", 4096)       # transformers' default, when the key is absent
    if family == "llama":
        return None                      # transformers' Llama has no window
    if family == "mistral":
        return _window(window)
    window = _window(window) if hf.get("use_sliding_window", False) else None
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or \
            not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"layer_types must list 'full_attention' / 'sliding_attention' for "
                         f"each of the {num_layers} layers, got {types!r}"[:300])
    windows = {window if t == "sliding_attention" else None for t in types}
    if len(windows) > 1:
        sliding = sum(t == "sliding_attention" for t in types)
        raise ValueError(f"layer-dependent attention is not supported: sliding_window {window} "
                         f"on {sliding} of {num_layers} layers (use_sliding_window with "
                         f"max_window_layers / layer_types); supported: the same window on "
                         f"every layer, or none")
    return windows.pop()


def _window(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"sliding_window must be null or an integer >= 1, got {value!r}"[:200])
    return value
