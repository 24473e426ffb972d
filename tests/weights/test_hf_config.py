"""config.json -> ModelConfig (weights/hf_config.py): the families, both RoPE formats, and a clear
refusal of every field that would change the output and is not implemented."""

from __future__ import annotations

import pytest

from pensieve_jax.model.rope import RopeScaling, yarn_mscale
from pensieve_jax.weights.hf_config import config_from_hf

BASE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096}


def cfg(arch: str | None = "LlamaForCausalLM", **over) -> dict:
    d = {**BASE, **({"architectures": [arch]} if arch else {})}
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


# -- families ---------------------------------------------------------------------------------------

def test_llama_plain_and_with_attention_bias():
    c = config_from_hf(cfg())
    assert (c.qkv_bias, c.o_bias, c.qk_norm, c.sliding_window) == (False, False, False, None)
    assert c.head_dim == 16 and c.rope_theta == 10000.0 and c.rope_scaling is None
    c = config_from_hf(cfg(attention_bias=True))
    assert (c.qkv_bias, c.o_bias) == (True, True)


def test_qwen2_has_qkv_bias_and_ignores_a_disabled_window():
    c = config_from_hf(cfg("Qwen2ForCausalLM", use_sliding_window=False, sliding_window=131072,
                           max_window_layers=2, tie_word_embeddings=True, rope_theta=1e6))
    assert (c.qkv_bias, c.o_bias, c.qk_norm) == (True, False, False)
    assert c.sliding_window is None and c.tie_word_embeddings and c.rope_theta == 1e6


def test_qwen3_has_qk_norm_and_transformers_default_head_dim():
    c = config_from_hf(cfg("Qwen3ForCausalLM", head_dim=None))
    assert c.qk_norm and not c.qkv_bias and c.head_dim == 128       # Qwen3Config's default
    c = config_from_hf(cfg("Qwen3ForCausalLM", head_dim=32, attention_bias=True))
    assert (c.head_dim, c.qkv_bias, c.o_bias) == (32, True, True)


def test_mistral_window_on_every_layer():
    assert config_from_hf(cfg("MistralForCausalLM", sliding_window=4096)).sliding_window == 4096
    assert config_from_hf({**cfg("MistralForCausalLM"), "sliding_window": None}
                          ).sliding_window is None          # null: no window (v0.2 on)
    assert config_from_hf(cfg("MistralForCausalLM")).sliding_window == 4096   # absent: the
    # default of transformers' MistralConfig


def test_model_type_without_architectures():
    assert config_from_hf(cfg(None, model_type="qwen3")).qk_norm
    assert config_from_hf(cfg(None)).name == "llama"


@pytest.mark.parametrize("over", [
    dict(use_sliding_window=True, sliding_window=64, max_window_layers=0),
    dict(use_sliding_window=True, sliding_window=64, layer_types=["sliding_attention"] * 4),
])
def test_qwen_uniform_window_is_supported(over):
    assert config_from_hf(cfg("Qwen2ForCausalLM", **over)).sliding_window == 64


@pytest.mark.parametrize("over", [
    dict(use_sliding_window=True, sliding_window=64, max_window_layers=2),
    dict(use_sliding_window=True, sliding_window=64,
         layer_types=["full_attention", "sliding_attention"] * 2),
])
def test_layer_dependent_window_is_refused(over):
    with pytest.raises(ValueError, match=r"layer-dependent attention.*sliding_window 64 on 2 of "
                                         r"4 layers.*supported: the same window"):
        config_from_hf(cfg("Qwen3ForCausalLM", **over))


# -- RoPE: both formats ------------------------------------------------------------------------------

def test_transformers5_rope_parameters_theta_is_read():
    """The silent failure of issue 23: theta only under rope_parameters."""
    c = config_from_hf(cfg(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert c.rope_theta == 500000.0 and c.rope_scaling is None


@pytest.mark.parametrize("fmt", ["legacy", "v5"])
def test_both_formats_give_the_same_config(fmt):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    over = (dict(rope_theta=500000.0, rope_scaling=rope) if fmt == "legacy" else
            dict(rope_parameters={**rope, "rope_theta": 500000.0}))
    c = config_from_hf(cfg(**over))
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_yarn_defaults_and_fields():
    c = config_from_hf(cfg(max_position_embeddings=131072, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}))
    s = c.rope_scaling
    assert (s.kind, s.factor, s.original_max_position_embeddings) == ("yarn", 4.0, 32768)
    assert (s.beta_fast, s.beta_slow, s.truncate) == (32.0, 1.0, True)
    assert s.cos_sin_factor() == pytest.approx(0.1 * __import__("math").log(4.0) + 1)
    c = config_from_hf(cfg(max_position_embeddings=8192, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": None, "beta_fast": 8,
        "mscale": 2.0, "mscale_all_dim": 1.0, "truncate": False,
        "original_max_position_embeddings": 2048}))
    s = c.rope_scaling
    assert s.factor == 4.0                     # max_position_embeddings / original
    assert (s.beta_fast, s.truncate) == (8.0, False)
    assert s.cos_sin_factor() == pytest.approx(yarn_mscale(4.0, 2.0) / yarn_mscale(4.0, 1.0))
    c = config_from_hf(cfg(original_max_position_embeddings=1024,      # top level wins
                           rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                         "original_max_position_embeddings": 4096,
                                         "attention_factor": 1.5}))
    assert c.rope_scaling.original_max_position_embeddings == 1024
    assert c.rope_scaling.cos_sin_factor() == 1.5


def test_dynamic_and_linear():
    c = config_from_hf(cfg(max_position_embeddings=2048,
                           rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert c.rope_scaling == RopeScaling("dynamic", 2.0, original_max_position_embeddings=2048)
    c = config_from_hf(cfg(rope_parameters={"rope_type": "linear", "factor": 3.0}))
    assert c.rope_scaling == RopeScaling("linear", 3.0)


@pytest.mark.parametrize("over,match", [
    (dict(rope_scaling={"rope_type": "longrope", "factor": 4.0}),
     r"unsupported rope type 'longrope' in rope_scaling \(supported: default, linear, dynamic, "
     r"yarn, llama3\)"),
    (dict(rope_parameters={"rope_type": "su", "rope_theta": 1e4}),
     r"unsupported rope type 'su' in rope_parameters"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"},
                           "sliding_attention": {"rope_type": "default"}}),
     r"rope_parameters per layer type \(full_attention, sliding_attention\)"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0},
          rope_scaling={"rope_type": "linear", "factor": 2.0}),
     r"rope_parameters \(rope_type 'yarn'\) and rope_scaling \(rope_type 'linear'\) disagree"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0\.5 is not supported"),
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25}),
     r"partial_rotary_factor 0\.25"),
    (dict(rope_scaling={"rope_type": "linear"}), r"rope_scaling: rope type 'linear' needs a factor"),
])
def test_rope_refusals(over, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(cfg(**over))


# -- what is refused ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,over,match", [
    ("MixtralForCausalLM", dict(num_local_experts=8),
     r"unsupported architecture \['MixtralForCausalLM'\]: mixture-of-experts models "
     r"\(num_local_experts=8\) are not supported \(supported: LlamaForCausalLM, "
     r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM\)"),
    ("Qwen3MoeForCausalLM", dict(num_experts=128), r"Qwen3MoeForCausalLM.*mixture-of-experts"),
    ("Qwen2VLForConditionalGeneration", dict(vision_config={"depth": 32}),
     r"Qwen2VLForConditionalGeneration.*multimodal models \(vision_config\)"),
    ("GPT2LMHeadModel", {}, r"unsupported architecture \['GPT2LMHeadModel'\] \(supported: "),
    (None, dict(model_type="gemma2"), r"unsupported model_type 'gemma2' \(supported: "),
    ("LlamaForCausalLM", dict(num_experts=8),
     r"mixture-of-experts models \(num_experts=8\) are not supported \(dense text decoders"),
    ("MistralForCausalLM", dict(text_config={}, vision_config={"x": 1}), r"multimodal"),
    ("LlamaForCausalLM", dict(quantization_config={"quant_method": "awq"}),
     r"quantization_config: quantized weights are not supported"),
    ("LlamaForCausalLM", dict(mlp_bias=True), r"mlp_bias: MLP biases are not supported"),
    ("LlamaForCausalLM", dict(hidden_act="gelu"),
     r"hidden_act 'gelu' is not supported \(supported: silu, swish\)"),
    ("Qwen2ForCausalLM", dict(final_logit_softcapping=30.0), r"final_logit_softcapping"),
    ("MistralForCausalLM", dict(sliding_window=0), r"sliding_window must be null or an integer"),
])
def test_refused_with_the_field_named(arch, over, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(cfg(arch, **over))


def test_fields_that_do_not_change_the_math_are_accepted():
    c = config_from_hf(cfg(attention_dropout=0.1, pretraining_tp=1, use_cache=True,
                           torch_dtype="bfloat16", bos_token_id=1, mlp_bias=False,
                           quantization_config=None, num_experts=0))
    assert c.num_layers == 4
