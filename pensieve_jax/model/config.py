"""Model configuration: one frozen dataclass for every Llama-family checkpoint we load."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as a checkpoint declares it.

    kind: "linear" (positions divided by factor), "llama3" (frequency-dependent, Llama 3.1+), or
    "freq_factors" (one divisor per frequency, as GGUF files store Llama 3.1 scaling).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in ("linear", "llama3", "freq_factors"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r} "
                             "(supported: linear, llama3, freq_factors)")
        object.__setattr__(self, "freq_factors", tuple(float(f) for f in self.freq_factors))
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3, Mistral, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    name: str = "llama"

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float32, with the declared scaling applied."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** exponents)
        s = self.rope_scaling
        if s is not None and s.kind == "linear":
            inv_freq = inv_freq / s.factor
        elif s is not None and s.kind == "llama3":
            low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
            high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
            mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv_freq = np.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)
        elif s is not None and s.kind == "freq_factors":
            if len(s.freq_factors) != len(inv_freq):
                raise ValueError(f"rope freq_factors has {len(s.freq_factors)} entries, "
                                 f"expected head_dim // 2 = {len(inv_freq)}")
            inv_freq = inv_freq / np.asarray(s.freq_factors, np.float64)
        return inv_freq.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """From a Hugging Face `config.json` dict (LlamaForCausalLM / MistralForCausalLM)."""
        archs = hf.get("architectures") or []
        known = {"LlamaForCausalLM", "MistralForCausalLM"}
        if archs and not set(archs) & known:
            raise ValueError(f"unsupported architecture {archs} (supported: {sorted(known)})")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", 10000.0),
            rope_scaling=rope_scaling_from_hf(hf.get("rope_scaling")),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            name=hf.get("_name_or_path") or (archs[0] if archs else "llama"),
        )


def rope_scaling_from_hf(d: dict[str, Any] | None) -> RopeScaling | None:
    if not d:
        return None
    kind = d.get("rope_type") or d.get("type")
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling("llama3", float(d["factor"]), float(d.get("low_freq_factor", 1.0)),
                           float(d.get("high_freq_factor", 4.0)),
                           int(d.get("original_max_position_embeddings", 8192)))
    if kind == "linear":
        return RopeScaling("linear", float(d["factor"]))
    raise ValueError(f"unsupported rope_scaling {d!r} (supported: linear, llama3)")


# Random-weight presets of real shapes: no file needed (tests, GPU speed work).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                        max_position_embeddings=2048, tie_word_embeddings=False, name="random:tiny"),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, name="random:smollm2-135m"),
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                             max_position_embeddings=4096, name="random:llama2-7b"),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             rope_theta=500000.0,
                             rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                             max_position_embeddings=131072, name="random:llama3-8b"),
    "mistral-7b": ModelConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              rope_theta=1000000.0, max_position_embeddings=32768,
                              name="random:mistral-7b"),
}
