"""GGUF files of the qwen2 and qwen3 architectures, written as llama.cpp's converter writes them
(q/k rows unpermuted: rotate-half RoPE; biases, q/k norms, tied output) from the weights of the
family fixtures: loaded, they give transformers' logits (tests/model/test_families.py's
reference), and what the loader cannot run exactly is refused."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from conftest import FIXTURES
from pensieve_jax.weights import load_model
from pensieve_jax.weights.assemble import ModelLoadError
from pensieve_jax.weights.gguf_file import config_from_metadata
from tests.model.test_families import assert_matches_reference
from tests.weights.test_gguf_file import CHAT_TEMPLATE, MERGES, gpt2_vocab

LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
          "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL:
        return GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER[module]}.{leaf}"


def copy_tokenizer(w: gguf.GGUFWriter, source) -> None:
    """The tokenizer.* metadata of the GGUF file `source`, with its value types, into `w`."""
    for key, field in gguf.GGUFReader(str(source)).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


def write_family_gguf(path, name: str, arch: str, extra=None, tokenizer_from=None) -> dict:
    """The fixture's weights (float32) and config as a GGUF file of `arch`; the tokenizer is
    copied from the GGUF file `tokenizer_from`, else a byte-level stand-in."""
    root = FIXTURES / "families" / name
    hf = json.loads((root / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_key_length(hf["head_dim"])
    w.add_value_length(hf["head_dim"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf["rope_theta"])
    w.add_vocab_size(hf["vocab_size"])
    scaling = hf.get("rope_scaling")
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    for key, value in (extra or {}).items():
        getattr(w, key)(value)
    if tokenizer_from is not None:
        copy_tokenizer(w, tokenizer_from)
    else:
        tokens, types = gpt2_vocab(hf["vocab_size"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")         # (the tokenizer is not what is tested here)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(MERGES)
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_chat_template(CHAT_TEMPLATE)
    with safe_open(str(root / "model.safetensors"), framework="flax") as f:
        for key in sorted(f.keys()):
            w.add_tensor(gguf_name(key), np.asarray(f.get_tensor(key).astype("float32")))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return json.loads((root / "reference.json").read_text())


@pytest.mark.parametrize("name,arch", [("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_qwen_gguf_matches_transformers(tmp_path, name, arch):
    path = tmp_path / f"{name}.gguf"
    ref = write_family_gguf(path, name, arch)
    model = load_model(str(path), "float32", cache_dir=False)
    c = model.config
    assert (c.qkv_bias, c.o_bias, c.qk_norm, c.sliding_window) == (
        ref["expect"]["qkv_bias"], ref["expect"]["o_bias"], ref["expect"]["qk_norm"], None)
    assert c.tie_word_embeddings == ref["expect"]["tie_word_embeddings"]
    assert (c.rope_scaling.kind if c.rope_scaling else None) == ref["expect"]["rope_kind"]
    assert_matches_reference(model, ref)


def test_gguf_sliding_window_is_read_and_patterns_refused(tmp_path):
    meta = {"general.architecture": "qwen2", "qwen2.embedding_length": 64,
            "qwen2.attention.head_count": 4, "qwen2.feed_forward_length": 128,
            "qwen2.block_count": 2, "qwen2.vocab_size": 512}
    assert config_from_metadata({**meta, "qwen2.attention.sliding_window": 32}, set(),
                                "m.gguf").sliding_window == 32
    with pytest.raises(ModelLoadError, match=r"sliding_window_pattern: layer-dependent"):
        config_from_metadata({**meta, "qwen2.attention.sliding_window_pattern": [True, False]},
                             set(), "m.gguf")
    with pytest.raises(ModelLoadError, match=r"qwen2\.rope\.scaling\.yarn_log_multiplier is not"):
        config_from_metadata({**meta, "qwen2.rope.scaling.type": "yarn",
                              "qwen2.rope.scaling.factor": 4.0,
                              "qwen2.rope.scaling.yarn_log_multiplier": 0.1}, set(), "m.gguf")
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF architecture 'qwen3moe' "
                                             r"\(mixture of experts, 128 experts"):
        config_from_metadata({"general.architecture": "qwen3moe", "qwen3moe.expert_count": 128},
                             set(), "m.gguf")
