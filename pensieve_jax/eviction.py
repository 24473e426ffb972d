"""Which cached chunk leaves a tier first: Pensieve's retention value, or plain LRU.

A chunk is `chunk_pages` consecutive pages of one idle conversation, always the front-most chunk
of that conversation in the tier (causal attention makes leading tokens the cheapest to
recompute). The policy scores candidate chunks; the lowest score is evicted first.
"""

from __future__ import annotations

from typing import Protocol

from pensieve_jax.config import ModelConfig


class EvictionPolicy(Protocol):
    name: str

    def score(self, first_token: int, num_tokens: int, idle_s: float, last_used: float) -> float:
        """Lower is evicted first. first_token: position of the chunk's first token."""


class PensievePolicy:
    """Retention value = recompute cost of the chunk / time its conversation has been idle.

    Cost of prefilling the token at position p is modelled as a + b * p: a for the weights
    (2 * parameters per token) and b for attention over p earlier tokens (4 * heads * head_dim
    per layer), so a chunk further into a conversation costs more to rebuild.
    """

    name = "pensieve"

    def __init__(self, config: ModelConfig):
        c = config
        per_layer_params = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim +
                            c.num_heads * c.head_dim * c.hidden_size +
                            3 * c.hidden_size * c.intermediate_size)
        self.a = 2.0 * per_layer_params
        self.b = 4.0 * c.num_heads * c.head_dim

    def cost(self, first_token: int, num_tokens: int) -> float:
        mid = first_token + (num_tokens - 1) / 2
        return num_tokens * (self.a + self.b * mid)

    def score(self, first_token: int, num_tokens: int, idle_s: float, last_used: float) -> float:
        return self.cost(first_token, num_tokens) / max(idle_s, 1e-3)


class LRUPolicy:
    """Least recently used conversation first (its front chunk first)."""

    name = "lru"

    def score(self, first_token: int, num_tokens: int, idle_s: float, last_used: float) -> float:
        return last_used + first_token * 1e-9     # ties inside a conversation: front first


def make_policy(name: str, config: ModelConfig) -> EvictionPolicy:
    if name == "pensieve":
        return PensievePolicy(config)
    if name == "lru":
        return LRUPolicy()
    raise ValueError(f"unknown eviction policy {name!r} (available: pensieve, lru)")
