"""Pensieve-JAX: stateful multi-turn LLM serving with a paged KV cache kept across turns.

    from pensieve_jax import Engine, SamplingParams
    engine = Engine.from_pretrained("smollm2-135m-instruct")
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    print(engine.tokenizer.decode(engine.generate(ids, SamplingParams(max_tokens=64))))
"""

from pensieve_jax.model.config import ModelConfig, RopeScaling
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.weights import DEFAULT_MODEL, ModelLoadError, load_model

__all__ = ["DEFAULT_MODEL", "Engine", "EngineConfig", "ModelConfig", "ModelLoadError",
           "RopeScaling", "SamplingParams", "load_model"]
