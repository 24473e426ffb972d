"""The engine: owns the model runner, the KV page pool and the tokenizer.

This is the foundation's single-request engine: `generate` prefills a prompt (in chunks of
max_batched_tokens) and decodes one token per step over the paged KV cache. The batching,
stateful engine builds on the same runner and names.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from pensieve_jax.cache import PageAllocator
from pensieve_jax.runner import ModelRunner, StepInput
from pensieve_jax.sampling import SamplingParams
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights import DEFAULT_MODEL, LoadedModel, load_model


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None        # None: room for 4 sequences of max_model_len
    max_model_len: int | None = None    # None: min(model context, 4096)
    max_batched_tokens: int = 512
    attention: str = "xla"

    def __post_init__(self):
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1, got {self.max_batched_tokens}")


class Engine:
    def __init__(self, model: LoadedModel, dtype="float32", config: EngineConfig = EngineConfig()):
        self.model = model
        self.engine_config = config
        self.max_model_len = config.max_model_len or min(model.config.max_position_embeddings, 4096)
        pages_per_seq = math.ceil(self.max_model_len / config.page_size)
        self.allocator = PageAllocator(config.num_pages or 4 * pages_per_seq)
        self.runner = ModelRunner(model, self.allocator.num_pages, config.page_size,
                                  config.attention, dtype)
        self._stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "steps": 0}

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_MODEL, dtype="float32", cache_dir=None,
                        **options) -> "Engine":
        """source: a .gguf path, a Hugging Face directory, a converted (orbax) directory,
        random:<preset>, or the alias smollm2-135m-instruct. options: EngineConfig fields."""
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = set(options) - fields
        if unknown:
            raise TypeError(f"unknown engine options {sorted(unknown)} (known: {sorted(fields)})")
        return cls(load_model(source, dtype, cache_dir), dtype, EngineConfig(**options))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    def stats(self) -> dict:
        return dict(self._stats, compilations=self.runner.num_compilations,
                    free_pages=self.allocator.num_free, total_pages=self.allocator.num_pages)

    def generate(self, prompt_token_ids: Sequence[int],
                 params: SamplingParams | None = None) -> list[int]:
        """Generate from one prompt. Returns the new token ids, without the stop token."""
        params = params or SamplingParams()
        prompt = self._check_prompt(prompt_token_ids, params)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.stop_token_ids)
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        ps = self.engine_config.page_size
        pages = self.allocator.allocate(math.ceil((len(prompt) + params.max_tokens) / ps))
        page_table = np.asarray([pages], np.int32)
        self._stats["requests"] += 1
        self._stats["prompt_tokens"] += len(prompt)
        try:
            out: list[int] = []
            done = 0
            while done < len(prompt):  # chunked prefill; the last chunk samples the first token
                chunk = prompt[done:done + self.engine_config.max_batched_tokens]
                token = self._run(chunk, done, page_table, params, seed, 0)
                done += len(chunk)
            while True:
                if token in stop_ids:
                    break
                out.append(token)
                if len(out) >= params.max_tokens or self._hit_stop_string(out, params.stop):
                    break
                token = self._run([token], len(prompt) + len(out) - 1, page_table, params, seed,
                                  len(out))
        finally:
            self.allocator.free(pages)
        self._stats["completion_tokens"] += len(out)
        return out

    def _run(self, tokens: list[int], start: int, page_table: np.ndarray, params: SamplingParams,
             seed: int, counter: int) -> int:
        n = len(tokens)
        self._stats["steps"] += 1
        step = StepInput(
            token_ids=np.asarray(tokens, np.int32),
            positions=np.arange(start, start + n, dtype=np.int32),
            page_table=page_table, kv_lens=np.asarray([start + n], np.int32),
            cu_q_lens=np.asarray([0, n], np.int32),
            temperature=np.asarray([params.temperature], np.float32),
            top_k=np.asarray([params.top_k], np.int32), top_p=np.asarray([params.top_p], np.float32),
            seeds=np.asarray([seed], np.uint32), counters=np.asarray([counter], np.int32))
        return int(self.runner.step(step)[0])

    def _hit_stop_string(self, out: list[int], stop: tuple[str, ...]) -> bool:
        if not stop:
            return False
        text = self.tokenizer.decode(out)
        return any(s in text for s in stop)

    def _check_prompt(self, ids: Sequence[int], params: SamplingParams) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TypeError("generate expects token ids; use engine.tokenizer.encode(text) first")
        try:
            prompt = [int(i) for i in ids]
        except (TypeError, ValueError) as e:
            raise TypeError(f"prompt_token_ids must be a sequence of ints: {e}") from e
        if not prompt:
            raise ValueError("prompt_token_ids is empty")
        vocab = self.model.config.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len {self.max_model_len}")
        return prompt
