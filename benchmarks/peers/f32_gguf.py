"""An all-F32 GGUF of the weights our loader produced, for llama.cpp: the same numbers Pensieve
computes with (the embedded SmolLM2 is a Q4_1/Q8_0 GGUF that pensieve_jax.weights dequantizes to
f32; llama.cpp given the original file would compute with the quantized blocks instead).

    write_f32_gguf(model, "smollm2-f32.gguf", source_gguf=path_of_the_original)

Tensors come from the loaded parameter tree (our layout: linears [in, out], stacked over layers)
and go back to llama.cpp's names and layout: linears [out, in] (numpy row-major, which GGUF
stores as ne = [in, out]), and q/k rows permuted back to llama.cpp's interleaved RoPE order
(our GGUF loader un-permutes them on reading: pensieve_jax/weights/gguf_file.py). The key/value
metadata (tokenizer, chat template, hyperparameters) is copied from the original file except
general.file_type (ALL_F32); a model without a file (random:<preset>) gets hyperparameters from
its config and a `no_vocab` tokenizer of vocab_size dummy tokens (token ids only).

Needs only numpy and gguf (both dependencies of the package); jax arrays are read with
np.asarray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

# our per-layer leaf -> llama.cpp tensor name after "blk.{i}."
LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


class LayoutError(ValueError):
    """The parameter tree is not the layout this writer knows (separate q/k/v and gate/up
    kernels stacked over layers)."""


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's
    permute); the inverse of gguf_file.unpermute_rope_rows."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _leaf(tree: dict, *path: str) -> np.ndarray:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise LayoutError(f"parameter tree has no {'/'.join(path)} (at {key!r})")
        node = node[key]
    return np.asarray(node, dtype=np.float32)


def gguf_tensors(params: dict, config) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, f32 array in GGUF row-major layout) for every tensor of the model."""
    p = params.get("params", params)
    yield "token_embd.weight", _leaf(p, "embed_tokens", "embedding")
    yield "output_norm.weight", _leaf(p, "norm", "weight")
    if not config.tie_word_embeddings:
        yield "output.weight", np.ascontiguousarray(_leaf(p, "lm_head", "kernel").T)
    stacked = {name: _leaf(p, "layers", name, "kernel") for name in LINEARS}
    norms = {name: _leaf(p, "layers", name, "weight") for name in NORMS}
    for name, arr in stacked.items():
        if arr.ndim != 3 or arr.shape[0] != config.num_layers:
            raise LayoutError(f"layers/{name}/kernel has shape {arr.shape}; expected "
                              f"[{config.num_layers}, in, out]")
    for i in range(config.num_layers):
        for ours, theirs in NORMS.items():
            yield f"blk.{i}.{theirs}.weight", np.ascontiguousarray(norms[ours][i])
        for ours, theirs in LINEARS.items():
            w = np.ascontiguousarray(stacked[ours][i].T)          # [out, in]
            if ours == "q_proj":
                w = _permute_rope_rows(w, config.num_heads)
            elif ours == "k_proj":
                w = _permute_rope_rows(w, config.num_kv_heads)
            yield f"blk.{i}.{theirs}.weight", np.ascontiguousarray(w)


def _config_metadata(writer: gguf.GGUFWriter, config) -> None:
    writer.add_name(str(config.name))
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.rope_scaling is not None:
        raise LayoutError("rope scaling is not written for a model without a source GGUF")
    writer.add_tokenizer_model("no_vocab")     # llama.cpp: vocab_size dummy tokens


def _copy_metadata(writer: gguf.GGUFWriter, reader: gguf.GGUFReader) -> None:
    """Every key/value of the original file but the architecture (the writer adds it), the
    GGUF.* header fields and general.file_type (replaced by ALL_F32)."""
    for field in reader.fields.values():
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
                          gguf.Keys.General.QUANTIZATION_VERSION) or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def write_f32_gguf(model, path: str | os.PathLike, source_gguf: str | None = None) -> dict:
    """Write `model` (a pensieve_jax LoadedModel) as an all-F32 GGUF at `path`. source_gguf:
    the file it was loaded from (its metadata is copied), or None (random weights). Returns a
    summary: path, tensors, bytes of tensor data, parameters."""
    config = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    arch = "llama"
    writer = gguf.GGUFWriter(str(tmp), arch)
    if source_gguf is not None:
        reader = gguf.GGUFReader(source_gguf)
        arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
        if arch_field is not None and arch_field.contents() != arch:
            raise LayoutError(f"{source_gguf}: architecture {arch_field.contents()!r}, not llama")
        _copy_metadata(writer, reader)
        if "rope_freqs.weight" in {t.name for t in reader.tensors}:
            raise LayoutError(f"{source_gguf}: rope_freqs.weight is not carried over")
    else:
        _config_metadata(writer, config)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    n_tensors = n_bytes = n_params = 0
    for name, arr in gguf_tensors(model.params, config):
        writer.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType.F32)
        n_tensors += 1
        n_bytes += arr.nbytes
        n_params += arr.size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return {"path": str(path), "tensors": n_tensors, "tensor_bytes": n_bytes,
            "parameters": n_params, "metadata_from": source_gguf or "config (no_vocab tokenizer)"}


def check_against_source(gguf_path: str, source_gguf: str, config, layers=(0,)) -> dict:
    """Whether the written file holds exactly the source file's tensors as our loader
    dequantizes them (gguf_file.dequantize, the loader's own function): token_embd and the
    given layers' tensors compared bit for bit. Returns {"checked": n, "max_abs_diff": x,
    "identical": bool}."""
    from pensieve_jax.weights.gguf_file import dequantize
    ours = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    src = {t.name: t for t in gguf.GGUFReader(source_gguf).tensors}
    names = ["token_embd.weight", "output_norm.weight"] + [
        n for n in src if n.startswith(tuple(f"blk.{i}." for i in layers))]
    worst, checked = 0.0, 0
    for n in names:
        a = dequantize(src[n], source_gguf)
        b = np.asarray(ours[n].data, np.float32).reshape(a.shape)
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
        checked += 1
    return {"checked": checked, "layers": list(layers), "max_abs_diff": worst,
            "identical": worst == 0.0}
