"""Turn per-layer checkpoint tensors (Hugging Face names and [out, in] layout) into our tree."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pensieve_jax.model.config import ModelConfig
from pensieve_jax.model.llama import param_shapes


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message names the source and the reason."""


# our per-layer module -> Hugging Face module under model.layers.{i}
LAYER_LINEARS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
LAYER_NORMS = {"input_layernorm": "input_layernorm",
               "post_attention_layernorm": "post_attention_layernorm",
               "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}     # Qwen3
# our leaf -> (Hugging Face tensor, transposed: [out, in] there)
_LEAVES = {"kernel": ("weight", True), "bias": ("bias", False), "weight": ("weight", False)}


def assemble_params(config: ModelConfig, get: Callable[[str], np.ndarray], dtype,
                    source: str) -> dict[str, Any]:
    """Build the parameter tree from `get(hf_name) -> array` ([out, in] for linears).

    The tensors asked for are the ones `Llama(config)` has (biases, q/k norms where the config
    says so). Layers are cast to `dtype` one at a time before stacking, so peak host memory
    stays near the size of the converted model.
    """
    expected = param_shapes(config, dtype)["params"]
    np_dtype = jnp.dtype(dtype)

    def take(name: str, transpose: bool) -> np.ndarray:
        a = np.asarray(get(name), dtype=np.float32)
        return (a.T if transpose else a).astype(np_dtype)

    def check(path: str, arr: np.ndarray, want) -> jax.Array:
        if tuple(arr.shape) != tuple(want.shape):
            raise ModelLoadError(f"{source}: tensor for {path} has shape {tuple(arr.shape)}, "
                                 f"expected {tuple(want.shape)} from the model config")
        return jnp.asarray(arr)

    layers: dict[str, Any] = {}
    for ours, leaves in expected["layers"].items():
        theirs = {**LAYER_LINEARS, **LAYER_NORMS}[ours]
        layers[ours] = {}
        for leaf, want in leaves.items():
            name, transpose = _LEAVES[leaf]
            stacked = np.stack([take(f"model.layers.{i}.{theirs}.{name}", transpose)
                                for i in range(config.num_layers)])
            path = f"layers.{ours}" + ("" if leaf != "bias" else ".bias")
            layers[ours][leaf] = check(path, stacked, want)

    params: dict[str, Any] = {
        "embed_tokens": {"embedding": check("embed_tokens", take("model.embed_tokens.weight", False),
                                            expected["embed_tokens"]["embedding"])},
        "layers": layers,
        "norm": {"weight": check("norm", take("model.norm.weight", False), expected["norm"]["weight"])},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": check("lm_head", take("lm_head.weight", True),
                                             expected["lm_head"]["kernel"])}
    return {"params": params}


def random_params(config: ModelConfig, dtype, seed: int = 0, std: float = 0.02) -> dict[str, Any]:
    """Random weights of the config's real shapes, created on the default device."""
    shapes = param_shapes(config, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        if jax.tree_util.keystr(path).endswith("['weight']"):  # RMSNorm scales
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            out.append(_normal(key, leaf.shape, leaf.dtype, std))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape, dtype, std):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
