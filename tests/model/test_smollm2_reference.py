"""The real model against an independent implementation of the same weights.

Reference: Hugging Face transformers (float32, CPU) loading the same GGUF file and dequantizing
it; fixtures/make_smollm2_reference.py made the fixture offline (see its docstring).
"""

import numpy as np
import pytest

from conftest import run_model
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.model.llama import Llama
from pensieve_jax.engine.sampling import SamplingParams


@pytest.mark.slow
def test_logits_match_transformers(smollm2, hf_reference):
    prompt = hf_reference["prompt_ids"]
    config = smollm2.config
    table = [list(range(9, 9 + -(-len(prompt) // 16)))]
    logits, _ = run_model(Llama(config), smollm2.params, config, [prompt], [0], table,
                          num_pages=16, page_size=16)
    ours = logits[hf_reference["logit_positions"]]
    assert np.abs(ours - hf_reference["logits"]).max() < 1e-3


@pytest.mark.slow
def test_greedy_continuation_matches_transformers(smollm2, hf_reference):
    engine = Engine(smollm2, "float32", EngineConfig(max_model_len=256, num_pages=32))
    out = engine.generate(hf_reference["prompt_ids"],
                          SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert out == hf_reference["greedy_ids"]
    assert engine.tokenizer.decode(out) == hf_reference["greedy_text"]


@pytest.mark.slow
def test_chat_reply_is_sensible_english(smollm2, hf_reference):
    engine = Engine(smollm2, "float32", EngineConfig(max_model_len=256, num_pages=32))
    out = engine.generate(hf_reference["prompt_ids"], SamplingParams(max_tokens=32))
    assert engine.tokenizer.decode(out) == "The capital of France is Paris."   # stops at <|im_end|>
