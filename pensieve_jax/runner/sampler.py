"""The per-row sampler that runs inside the jitted step (engine.sampling.SamplingParams says
what each row asks for)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """One token per row.

    logits [S, V] float32; temperature, top_p [S] float32; top_k [S] int32 (0: off);
    seeds [S] uint32 and counters [S] int32 (the row's output index) make the random stream of a
    request independent of what else is in the batch. Returns [S] int32.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        vocab = logits.shape[-1]
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        values, order = jax.lax.top_k(scaled, vocab)            # sorted, descending
        ranks = jnp.arange(vocab, dtype=jnp.int32)[None, :]
        keep = ranks < jnp.where(top_k > 0, top_k, vocab)[:, None]
        probs = jax.nn.softmax(jnp.where(keep, values, -jnp.inf), axis=-1)
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]   # the top token stays
        values = jnp.where(keep, values, -jnp.inf)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
        choice = jax.vmap(jax.random.categorical)(keys, values)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
    return jnp.where(temperature > 0, drawn, greedy)
