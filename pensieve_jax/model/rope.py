"""Rotary position embeddings (RoPE): the frequencies a checkpoint declares, and their tables.

Every scaling here is the one Hugging Face transformers computes (modeling_rope_utils), so the
same checkpoint gives the same rotations:

    linear        positions divided by `factor`
    llama3        frequency-dependent (Llama 3.1+)
    freq_factors  one divisor per frequency (how GGUF files store Llama 3.1 scaling)
    yarn          YaRN: interpolation ramped by frequency, cos/sin times `attention_factor`
    dynamic       dynamic NTK: past `original_max_position_embeddings` the base grows with the
                  sequence length; here the length is each token's own position + 1, which is
                  what transformers uses for a token generated one at a time, so a token's
                  rotation depends only on its position (a cached key never changes)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_KINDS = ("linear", "llama3", "freq_factors", "yarn", "dynamic")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as a checkpoint declares it (kind: one of ROPE_KINDS).

    original_max_position_embeddings: the pretraining context (llama3, yarn); for dynamic, the
    length up to which the base is unscaled (transformers' max_position_embeddings).
    yarn only: beta_fast, beta_slow, truncate, attention_factor (None: 0.1 ln(factor) + 1).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] = ()
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unsupported rope scaling type {self.kind!r} "
                             f"(supported: {', '.join(ROPE_KINDS)})")
        object.__setattr__(self, "freq_factors", tuple(float(f) for f in self.freq_factors))
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope scaling original_max_position_embeddings must be positive, "
                             f"got {self.original_max_position_embeddings}")

    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by (yarn's attention factor; 1 for the others)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return yarn_mscale(self.factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale: 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32, with the scaling applied (dynamic: the
    unscaled ones, in force up to original_max_position_embeddings)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    base = 1.0 / (theta ** exponents)
    s = scaling
    if s is None or s.kind == "dynamic":
        out = base
    elif s.kind == "linear":
        out = base / s.factor
    elif s.kind == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / base
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, base / s.factor, base)
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        out = np.where(mid, (1 - smooth) * base / s.factor + smooth * base, scaled)
    elif s.kind == "freq_factors":
        if len(s.freq_factors) != len(base):
            raise ValueError(f"rope freq_factors has {len(s.freq_factors)} entries, "
                             f"expected head_dim // 2 = {len(base)}")
        out = base / np.asarray(s.freq_factors, np.float64)
    else:                                                   # yarn
        out = _yarn(head_dim, theta, s)
    return np.asarray(out, np.float32)


def _yarn(dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """YaRN's frequencies, as transformers computes them (float32 throughout)."""
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                ) / (2 * math.log(theta))
    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                       # no division by zero
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(s.factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) /
                   np.float32(high - low), 0, 1)
    keep = np.float32(1) - ramp                             # the extrapolated share
    return interpolation * (1 - keep) + extrapolation * keep


def rope_tables(positions: jax.Array, inv_freq: jax.Array,
                cos_sin_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim] (float32) for rotate-half RoPE at the given positions [T].
    inv_freq: [head_dim // 2], or [T, head_dim // 2] (one set per token: dynamic scaling)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if cos_sin_factor == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * cos_sin_factor, jnp.sin(emb) * cos_sin_factor


def dynamic_inv_freq(positions: jax.Array, head_dim: int, theta: float,
                     s: RopeScaling) -> jax.Array:
    """Dynamic NTK's per-token frequencies [T, head_dim // 2] (float32): a token at position p
    past original_max_position_embeddings M uses base theta * (factor (p + 1) / M - (factor -
    1)) ** (d / (d - 2)); earlier tokens the unscaled frequencies."""
    m = s.original_max_position_embeddings
    length = jnp.maximum(positions.astype(jnp.int32) + 1, m).astype(jnp.float32)
    base = theta * ((s.factor * length / m) - (s.factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    scaled = 1.0 / (base[:, None] ** exponents[None, :])
    plain = jnp.asarray(inv_freq(head_dim, theta, None))
    return jnp.where((positions + 1 > m)[:, None], scaled, plain[None, :])


def positions_rope(positions: jax.Array, head_dim: int, theta: float,
                   scaling: RopeScaling | None) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim] for a model's RoPE (theta, scaling) at the positions [T]."""
    if scaling is not None and scaling.kind == "dynamic":
        return rope_tables(positions, dynamic_inv_freq(positions, head_dim, theta, scaling))
    factor = 1.0 if scaling is None else scaling.cos_sin_factor()
    return rope_tables(positions, jnp.asarray(inv_freq(head_dim, theta, scaling)), factor)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, head_dim]; the two halves of head_dim are the rotated pairs (HF layout)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)
