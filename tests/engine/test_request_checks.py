"""Bad requests are refused before any work, with a ValueError naming the field (issue 20):
sampling values (SamplingParams alone, then against the model at submit), prompts that cannot
fit max_model_len (token ids, or text too long to be tokenized at all)."""

from __future__ import annotations

import math

import pytest

from pensieve_jax.engine.request import text_byte_limit
from pensieve_jax.engine.sampling import INT32_MAX, SamplingParams
from pensieve_jax.session import check_size
from tests.engine.test_engine_over_fake_runner import CONFIG, MODEL, engine


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 2**31), ("max_tokens", 1.5),
    ("max_tokens", True),
    ("temperature", math.inf), ("temperature", -math.inf), ("temperature", math.nan),
    ("temperature", -0.1), ("temperature", 101.0), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan), ("top_p", math.inf),
    ("top_k", -1), ("top_k", 2**31), ("top_k", 2**63), ("top_k", 0.5),
    ("seed", -1), ("seed", 2**32), ("seed", 1.0),
    ("stop", ("",)), ("stop", tuple("abcdefghijklmnopq")), ("stop", ("x" * 1025,)),
    ("stop", (3,)),
    ("stop_token_ids", (-1,)), ("stop_token_ids", (2**31,)), ("stop_token_ids", tuple(range(1025))),
])
def test_bad_sampling_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert len(str(info.value)) < 250


def test_good_sampling_values_pass():
    p = SamplingParams(max_tokens=INT32_MAX, temperature=100, top_p=1e-9, top_k=INT32_MAX,
                       seed=2**32 - 1, stop=("x" * 1024,) * 16, stop_token_ids=(0, INT32_MAX))
    assert p.temperature == 100.0 and isinstance(p.temperature, float)


def test_submit_checks_sampling_against_the_model():
    vocab = CONFIG.vocab_size
    with engine() as eng:
        for params, field in ((SamplingParams(top_k=vocab + 1), "top_k"),
                              (SamplingParams(top_k=2**31 - 1), "top_k"),
                              (SamplingParams(stop_token_ids=(vocab,)), "stop_token_ids")):
            with pytest.raises(ValueError, match=field):
                eng.submit([1, 2, 3], params)
        with pytest.raises(ValueError, match="max_model_len"):
            eng.submit(list(range(1, 97)), SamplingParams(max_tokens=1))
        ok = eng.submit([1, 2, 3], SamplingParams(max_tokens=2, top_k=vocab, ignore_eos=True))
        assert len(ok.result().token_ids) == 2
        # max_tokens beyond max_model_len is not refused here: the turn ends at max_model_len
        out = eng.submit([1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True)).result()
        assert out.finish_reason == "length" and len(out.token_ids) == 96 - 3


def test_text_that_cannot_fit_is_refused_before_tokenizing():
    with engine() as eng:
        limit = text_byte_limit(MODEL.tokenizer, eng.max_model_len)
        assert eng.max_text_bytes == limit and limit >= eng.max_model_len
        eng.check_text(limit, "prompt")
        with pytest.raises(ValueError, match="messages is"):
            eng.check_text(limit + 1, "messages")
        with pytest.raises(ValueError, match="history"):
            check_size(eng, [{"role": "user", "content": "x" * (limit + 1)}], "history")
        with pytest.raises(ValueError, match="cannot fit"):
            check_size(eng, [{"role": "user", "content": ""}] * 96)
        with pytest.raises(ValueError, match="max_model_len"):
            eng.session().send("é" * (limit // 2 + 1))
