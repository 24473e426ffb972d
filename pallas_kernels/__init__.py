"""Pallas GPU kernels, each with a pure-jnp reference beside it.

Empty so far: the ragged multi-query paged attention kernel (design.md section 5) arrives with
its own issue. Until then the model uses the XLA path in `pensieve_jax.attention`, which takes
the same arguments (plus the stacked-layer pools and a layer index).
"""
