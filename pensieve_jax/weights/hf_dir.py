"""Load a Hugging Face model directory: config.json (read by hf_config), *.safetensors,
tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from pensieve_jax.model.config import ModelConfig
from pensieve_jax.weights.hf_config import config_from_hf
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights.assemble import ModelLoadError, assemble_params


def _read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path.parent}: missing {path.name}")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from e


def load_hf_dir(directory: str, dtype) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    root = Path(directory)
    try:
        config = config_from_hf(_read_json(root / "config.json"))
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{root}/config.json: {e}") from e

    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{root}: no *.safetensors weight files")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="flax") as handle:
            for name in handle.keys():
                where[name] = f

    def get(name: str) -> np.ndarray:
        if name == "lm_head.weight" and name not in where and config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        if name not in where:
            raise ModelLoadError(f"{root}: safetensors files lack tensor {name}")
        with safe_open(str(where[name]), framework="flax") as handle:
            return np.asarray(handle.get_tensor(name).astype("float32"))

    params = assemble_params(config, get, dtype, str(root))
    tok_json = root / "tokenizer.json"
    if not tok_json.exists():
        raise ModelLoadError(f"{root}: missing tokenizer.json")
    tokenizer = Tokenizer.from_hf_files(tok_json.read_text(),
                                        _read_json(root / "tokenizer_config.json", False) or {},
                                        _read_json(root / "generation_config.json", False))
    return config, params, tokenizer
