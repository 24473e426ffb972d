"""Llama-family decoder in Flax, functional over a paged KV cache (Llama, Mistral, Qwen2, Qwen3:
the differences are ModelConfig's qkv_bias, o_bias, qk_norm, sliding_window and rope_scaling).

The cache is passed in and returned, never held: `Llama.apply(params, token_ids, positions, kv,
batch)` returns `(logits, kv)`. Layers are stacked and run with `nn.scan`, so a 30-layer model
compiles about as fast as a 1-layer one; the KV pools ride in the scan carry and are updated in
place (scatter into a loop carry needs no copy when the caller donates them).

Parameter names follow Hugging Face's Llama (and Qwen3's q_norm / k_norm) so that loaders map
weights one to one; Dense kernels are stored [in, out] and every per-layer leaf has a leading
[num_layers] axis.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pensieve_jax.model.attention import (AttentionBatch, Incoming, KVCache, get_attention,
                                          load_pages, token_slots, write_kv)
from pensieve_jax.model.config import ModelConfig
from pensieve_jax.model.parallel import HEADS_SPEC, VOCAB_SPEC, constrain
from pensieve_jax.model.rope import apply_rope, positions_rope


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * weight.astype(jnp.float32)).astype(self.dtype)


class Bias(nn.Module):
    """A projection's bias alone ([n], named as nn.Dense names it): the fused-kernel layout
    keeps the biases in params while the kernels travel apart."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)


def fetch_layer(incoming: Incoming, layer) -> tuple[jax.Array, jax.Array]:
    """Start copying one layer of the incoming pages from host to device memory."""
    return tuple(jax.device_put(a[layer], jax.memory.Space.Device) for a in incoming[:2])


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: Any
    attention: str
    mesh: Any = None         # a jax.sharding.Mesh with axis "tp": heads are split over it
    interpret: bool = False  # run the attention kernel's interpreter (Pallas off GPU)
    cpu_kernels: bool = False    # attention's CPU kernels (cpu_kernels/) where it has them

    @nn.compact
    def __call__(self, carry, layer, rope, slots, batch: AttentionBatch,
                 incoming: Incoming | None, kernels: dict[str, tuple] | None = None):
        h, kv, arrived = carry
        c = self.config
        if incoming is not None:    # this layer's pages are in; the next layer's start coming
            kv = load_pages(kv, layer, *arrived, incoming.page_ids)
            arrived = fetch_layer(incoming, jnp.minimum(layer + 1, c.num_layers - 1))

        def dense(n: int, name: str, bias: bool = False):
            if kernels is None:          # this layer's slice of the stacked kernel
                return nn.Dense(n, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype,
                                name=name)
            if bias:
                return lambda x: picked(name)(x) + Bias(n, self.dtype, name=name)()
            return picked(name)

        def picked(name: str):
            # one array per layer, picked by a switch: XLA CPU copies a dynamic slice of a
            # stacked kernel before its dot (a second pass over the weights); a branch reads
            # its own array in place
            return lambda x: jax.lax.switch(
                layer, [functools.partial(_matmul, w=w) for w in kernels[name]], x)
        num_tokens = h.shape[0]
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

        x = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(h)
        if kernels is None:
            q, k, v = (dense(q_width, "q_proj", c.qkv_bias)(x),
                       dense(kv_width, "k_proj", c.qkv_bias)(x),
                       dense(kv_width, "v_proj", c.qkv_bias)(x))
        else:                            # fused: one matmul for q, k and v
            q, k, v = jnp.split(picked("qkv_proj")(x), [q_width, q_width + kv_width], axis=-1)
            if c.qkv_bias:
                q, k, v = (a + Bias(n, self.dtype, name=name)() for a, n, name in
                           ((q, q_width, "q_proj"), (k, kv_width, "k_proj"),
                            (v, kv_width, "v_proj")))
        q = q.reshape(num_tokens, c.num_heads, c.head_dim)
        k = k.reshape(num_tokens, c.num_kv_heads, c.head_dim)
        v = v.reshape(num_tokens, c.num_kv_heads, c.head_dim)
        if c.qk_norm:                    # Qwen3: each head normalized before RoPE
            q = RMSNorm(c.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, name="k_norm")(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (constrain(a, self.mesh, HEADS_SPEC) for a in (q, k, v))

        kv = write_kv(kv, layer, k, v, slots)
        attn = get_attention(self.attention)(q, kv, layer, batch, sm_scale=c.head_dim ** -0.5,
                                             sliding_window=c.sliding_window, mesh=self.mesh,
                                             interpret=self.interpret,
                                             cpu_kernels=self.cpu_kernels)
        attn = constrain(attn, self.mesh, HEADS_SPEC)
        h = h + dense(c.hidden_size, "o_proj", c.o_bias)(attn.reshape(num_tokens, -1))

        x = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(h)
        if kernels is None:
            gate, up = dense(c.intermediate_size, "gate_proj")(x), dense(
                c.intermediate_size, "up_proj")(x)
        else:                            # fused: one matmul for gate and up
            gate, up = jnp.split(picked("gate_up_proj")(x), 2, axis=-1)
        h = h + dense(c.hidden_size, "down_proj")(nn.silu(gate) * up)
        return (h, kv, arrived), None


LOGITS_CHUNK = 8   # rows per step of the vocabulary projection when only some rows are real


class Llama(nn.Module):
    """Decoder over a paged KV cache.

    __call__(token_ids [T] int32, positions [T] int32, kv: KVCache, batch: AttentionBatch,
             logits_indices [R] int32 | None) -> (logits [R or T, vocab] float32, kv)

    mesh: None, or a Mesh with axis "tp" (pensieve_jax.model.parallel) that params and pools are
    sharded over; attention then runs per shard of heads.
    num_logits: None, or an int32 scalar: only the first num_logits of the R rows need logits
    (a step program's sequences beyond its real ones); the rest come out 0, uncomputed.
    layer_kernels: None (each layer's matmul kernels are slices of the stacked params), or
    the kernels one array per layer, {name: (layer 0's, layer 1's, ...)}, without them in
    params (`unstack_kernels`): the layout for XLA CPU, which copies a slice before its dot.
    interpret: run the attention kernel's interpreter instead of compiling it ("pallas" off a
    GPU); explicit, never inferred from the default backend (the runner sets it from the
    platform of the devices it compiles for).
    cpu_kernels: the attention backend's CPU kernels (cpu_kernels/: "xla"'s decode rows) in
    the program; the runner sets it (a CPU, float32, the kernels built).
    incoming: None, or pages in host memory to load into the pools during the step. Layer l's
    pages are written just before layer l writes and reads the pools, and the copy of layer
    l + 1's pages is started then, so it runs while layer l computes (double buffering; the
    last layer's pages are fetched twice, a 1/num_layers overhead).
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"
    mesh: Any = None
    interpret: bool = False
    cpu_kernels: bool = False

    @nn.compact
    def __call__(self, token_ids, positions, kv: KVCache, batch: AttentionBatch,
                 logits_indices=None, incoming: Incoming | None = None,
                 num_logits: jax.Array | None = None,
                 layer_kernels: dict[str, tuple] | None = None):
        c = self.config
        batch = AttentionBatch(*(jnp.asarray(a, jnp.int32) for a in batch))
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         name="embed_tokens")
        h = embed(token_ids)
        rope = positions_rope(positions, c.head_dim, c.rope_theta, c.rope_scaling)
        slots = token_slots(positions, batch, kv.num_pages, kv.page_size)

        arrived = None if incoming is None else fetch_layer(incoming, 0)
        layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0,) + (nn.broadcast,) * 5, length=c.num_layers)
        (h, kv, _), _ = layers(c, self.dtype, self.attention, self.mesh, self.interpret,
                               self.cpu_kernels, name="layers")(
            (h, kv, arrived), jnp.arange(c.num_layers, dtype=jnp.int32), rope, slots, batch,
            incoming, layer_kernels)

        if logits_indices is not None:
            h = h[logits_indices]
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(h)
        if c.tie_word_embeddings:     # [vocab, hidden], contracted on its minor axis as it
            weight, spec = embed.embedding, "rh,vh->rv"    # lies (a transpose would copy it)
        else:
            weight, spec = LMHead(c.vocab_size, self.dtype, name="lm_head")(h.shape[-1]), "rh,hv->rv"

        def head(rows):
            logits = jnp.einsum(spec, rows, weight.astype(self.dtype))
            return constrain(logits, self.mesh, VOCAB_SPEC).astype(jnp.float32)
        if num_logits is None:
            return head(h), kv
        # only the first num_logits rows are real (the rest pad the step's sequences): the
        # vocabulary projection runs over them in chunks, a loop with a dynamic trip count
        rows = h.shape[0]
        chunk = min(LOGITS_CHUNK, rows)
        padded = -(-rows // chunk) * chunk
        h = jnp.pad(h, ((0, padded - rows), (0, 0)))

        def body(i, logits):
            part = head(jax.lax.dynamic_slice_in_dim(h, i * chunk, chunk))
            return jax.lax.dynamic_update_slice_in_dim(logits, part, i * chunk, 0)
        logits = jnp.zeros((padded, c.vocab_size), jnp.float32)
        logits = jax.lax.fori_loop(0, -(-num_logits // chunk), body, logits)
        return logits[:rows], kv


class LMHead(nn.Module):
    """The output projection's kernel [hidden, vocab] (named as nn.Dense names it)."""

    vocab_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_size: int) -> jax.Array:
        return self.param("kernel", nn.initializers.lecun_normal(),
                          (hidden_size, self.vocab_size), self.dtype)


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> Any:
    """The parameter tree of `Llama(config)` as ShapeDtypeStructs (no memory allocated)."""
    model = Llama(config, dtype)
    pool = jax.ShapeDtypeStruct((config.num_layers, 1, 1, config.num_kv_heads, config.head_dim),
                                dtype)
    kv = KVCache(pool, pool)
    batch = AttentionBatch(jax.ShapeDtypeStruct((1, 1), jnp.int32),
                           jax.ShapeDtypeStruct((1,), jnp.int32),
                           jax.ShapeDtypeStruct((2,), jnp.int32))
    ids = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids, ids, kv, batch)


FUSED_KERNELS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                 "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w)


def unstack_kernels(params: Any) -> tuple[Any, dict[str, tuple]]:
    """Loaded params (every layer leaf stacked, [num_layers, ...]) -> (the same tree without
    the layers' matmul kernels, those kernels one array per layer: {name: (layer 0's, ...)}),
    as `Llama.__call__(..., layer_kernels=)` takes them. q/k/v and gate/up are fused
    (FUSED_KERNELS: their columns side by side), one matmul each; biases stay in the tree."""
    layers = dict(params["params"]["layers"])
    stacked = {}
    for name in (name for parts in FUSED_KERNELS.values() for name in parts):
        module = dict(layers.pop(name))
        stacked[name] = module.pop("kernel")
        if module:                       # a bias
            layers[name] = module
    kernels = {fused: tuple(jnp.concatenate([stacked[p][i] for p in parts], axis=-1)
                            if len(parts) > 1 else stacked[parts[0]][i]
                            for i in range(stacked[parts[0]].shape[0]))
               for fused, parts in FUSED_KERNELS.items()}
    return {**params, "params": {**params["params"], "layers": layers}}, kernels
