"""The model layer: configuration, the Llama decoder over a paged KV cache, attention
backends, tensor parallelism."""
