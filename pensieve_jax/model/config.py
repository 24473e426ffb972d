"""Model configuration: one frozen dataclass for every decoder we load (Llama 2/3, Mistral,
Qwen2/Qwen2.5, Qwen3 dense, SmolLM2), and random-weight presets of real shapes."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pensieve_jax.model.rope import RopeScaling, inv_freq

__all__ = ["PRESETS", "ModelConfig", "RopeScaling"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-style decoder: RMSNorm, RoPE, grouped-query attention,
    SwiGLU MLP; the family differences are the fields after `name`:

    qkv_bias        q/k/v projections carry a bias (Qwen2; attention_bias of Llama / Qwen3)
    o_bias          o_proj carries a bias (attention_bias of Llama / Qwen3)
    qk_norm         per-head RMSNorm of q and k (weights [head_dim]) before RoPE (Qwen3)
    sliding_window  each query attends to the last `sliding_window` positions, itself
                    included (Mistral; the same window on every layer); None: all of them
    """

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
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

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
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"ModelConfig.sliding_window must be None or an integer >= 1, "
                             f"got {window!r}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float32, with the declared scaling applied
        (dynamic scaling: the unscaled ones; the model scales them per position)."""
        return inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


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
                              name="random:mistral-7b"),        # v0.3: no window
    "mistral-7b-v0.1": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                   num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                   rope_theta=10000.0, max_position_embeddings=32768,
                                   sliding_window=4096, name="random:mistral-7b-v0.1"),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                                rms_norm_eps=1e-6, rope_theta=1000000.0,
                                max_position_embeddings=32768, tie_word_embeddings=True,
                                qkv_bias=True, name="random:qwen2.5-0.5b"),
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                              rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=32768, qkv_bias=True,
                              name="random:qwen2.5-7b"),
    "qwen3-8b": ModelConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                            rms_norm_eps=1e-6, rope_theta=1000000.0,
                            max_position_embeddings=40960, qk_norm=True, name="random:qwen3-8b"),
}
