"""The foundation engine on random:tiny: generate, sampling, bucketing and bad input."""

import numpy as np
import pytest

from pensieve_jax.engine import Engine
from pensieve_jax.sampling import SamplingParams
from pensieve_jax.weights import ModelLoadError


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("random:tiny", max_model_len=128, num_pages=64, page_size=8,
                                  max_batched_tokens=16)


def greedy_by_recompute(engine, prompt, n):
    """Reference: every token from a fresh full prefill of the whole sequence so far."""
    seq, out = list(prompt), []
    for _ in range(n):
        token = engine.generate(seq, SamplingParams(max_tokens=1, ignore_eos=True))[0]
        out.append(token)
        seq.append(token)
    return out


def test_cached_decode_equals_recompute_from_scratch(engine):
    prompt = list(np.random.default_rng(3).integers(0, 256, 37))   # 3 prefill chunks of <= 16
    out = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    assert len(out) == 12
    assert out == greedy_by_recompute(engine, prompt, 12)


def test_pages_are_returned(engine):
    before = engine.stats()["free_pages"]
    engine.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    assert engine.stats()["free_pages"] == before == engine.stats()["total_pages"]


def test_same_seed_same_output_and_temperature_varies(engine):
    prompt = [5, 6, 7, 8]
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    assert engine.generate(prompt, p) == engine.generate(prompt, p)
    outs = {tuple(engine.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=s,
                                                          ignore_eos=True))) for s in range(4)}
    assert len(outs) > 1
    top1 = SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=9, ignore_eos=True)
    assert engine.generate(prompt, top1) == engine.generate(prompt, SamplingParams(
        max_tokens=10, ignore_eos=True))


def test_stop_token_ids_and_stop_strings(engine):
    prompt = [10, 11, 12]
    free = engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    cut = engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True,
                                                 stop_token_ids=[free[3]]))
    assert cut == free[:free.index(free[3])]
    text_prefix = engine.tokenizer.decode(free[:2])
    if text_prefix:
        stopped = engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True,
                                                         stop=[text_prefix]))
        assert len(stopped) <= 2


def test_steady_workload_does_not_recompile(engine):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine.generate([1, 2, 3, 4, 5], params)
    compiled = engine.stats()["compilations"]
    for n in (3, 4, 6, 7):          # same buckets: prompt <= 8 tokens, <= 4 pages
        engine.generate(list(range(1, n + 1)), params)
    assert engine.stats()["compilations"] == compiled


@pytest.mark.parametrize("prompt,params,error,match", [
    ([], None, ValueError, "empty"),
    ("hello", None, TypeError, "token ids"),
    ([1, 100000], None, ValueError, "out of range"),
    ([1] * 120, SamplingParams(max_tokens=20), ValueError, "exceeds max_model_len"),
])
def test_bad_input_is_a_clear_error(engine, prompt, params, error, match):
    free = engine.stats()["free_pages"]
    with pytest.raises(error, match=match):
        engine.generate(prompt, params)
    assert engine.stats()["free_pages"] == free


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_engine_options():
    with pytest.raises(TypeError, match="unknown engine options"):
        Engine.from_pretrained("random:tiny", page_sise=16)
    with pytest.raises(ValueError, match="power of two"):
        Engine.from_pretrained("random:tiny", page_size=12)
    with pytest.raises(ModelLoadError, match="unknown model source 'no-such-model'"):
        Engine.from_pretrained("no-such-model")
