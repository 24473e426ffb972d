"""Save and restore a converted model with orbax-checkpoint, so a restart skips conversion.

Layout of a converted model directory:
    pensieve_model.json       format version, ModelConfig, dtype, where it came from
    tokenizer.json            the tokenizers-library tokenizer
    tokenizer_settings.json   special ids, chat template, add_bos_token
    params/                   orbax checkpoint of the parameter tree
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from pensieve_jax.model.config import ModelConfig
from pensieve_jax.model.llama import param_shapes
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights.assemble import ModelLoadError

MARKER = "pensieve_model.json"
FORMAT = 1


def is_converted_dir(path: Path) -> bool:
    return (path / MARKER).is_file()


def save_converted(directory: str | Path, config: ModelConfig, params: Any, tokenizer: Tokenizer,
                   dtype, source: str = "") -> Path:
    """Write the model to `directory` atomically (a temp dir renamed into place)."""
    final = Path(directory).absolute()
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
    tok_json, settings = tokenizer.to_files()
    (tmp / "tokenizer.json").write_text(tok_json)
    (tmp / "tokenizer_settings.json").write_text(json.dumps(settings))
    (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "config": config.to_dict(),
                                          "dtype": jnp.dtype(dtype).name, "source": source}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_converted(directory: str | Path, dtype=None) -> tuple[ModelConfig, Any, Tokenizer]:
    """Restore a converted model; `dtype` (if given and different) casts after restoring."""
    root = Path(directory).absolute()
    try:
        info = json.loads((root / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{root}: not a readable converted model ({e})") from e
    if info.get("format") != FORMAT:
        raise ModelLoadError(f"{root}: converted-model format {info.get('format')} "
                             f"is not {FORMAT}; convert again")
    config = ModelConfig.from_dict(info["config"])
    saved_dtype = jnp.dtype(info["dtype"])
    target = param_shapes(config, saved_dtype)
    try:
        params = ocp.StandardCheckpointer().restore(root / "params", target)
    except Exception as e:
        raise ModelLoadError(f"{root}/params: cannot restore orbax checkpoint: {e}") from e
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    tokenizer = Tokenizer.from_saved((root / "tokenizer.json").read_text(),
                                     json.loads((root / "tokenizer_settings.json").read_text()))
    return config, params, tokenizer
