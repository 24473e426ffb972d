"""Every model family against the reference implementation, and cached == recomputed for each.

The fixtures (tests/fixtures/families/<name>/: a Hugging Face directory of a tiny random model
with the family's real feature set, and reference.json) were made once by
scripts/make_family_fixtures.py with transformers (float32): greedy continuations and logits of
fixed prompts. Here they are loaded with our loader and compared; no torch needed.

    qwen2          q/k/v biases, tied embeddings, transformers 4 config format
    qwen3          per-head q/k RMSNorm, YaRN RoPE (rope_scaling), 3 layers
    mistral        sliding window 16 on 3 layers, a 40-token prompt, continuations past it
    llama-yarn     YaRN in transformers 5's rope_parameters (beta_fast set)
    llama-dynamic  dynamic NTK RoPE past max_position_embeddings 32; attention_bias (q/k/v/o)
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES, run_model
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.model.llama import Llama
from pensieve_jax.weights import load_model

FAMILIES = ("llama-dynamic", "llama-yarn", "mistral", "qwen2", "qwen3")
ENGINE = dict(max_model_len=160, page_size=8, max_batched_tokens=16, max_num_seqs=4,
              num_pages=96)
LOGITS_ATOL = 1e-4


def test_every_fixture_is_tested():
    on_disk = sorted(d.name for d in (FIXTURES / "families").iterdir() if d.is_dir())
    assert on_disk == sorted(FAMILIES)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    root = FIXTURES / "families" / request.param
    ref = json.loads((root / "reference.json").read_text())
    return load_model(str(root), "float32", cache_dir=False), ref


@pytest.fixture(scope="module")
def engines(family):
    """A stateful engine and a stateless one (every turn recomputed from its whole history)."""
    model, _ = family
    made = {policy: Engine(model, "float32", EngineConfig(cache_policy=policy, **ENGINE))
            for policy in ("stateful", "stateless")}
    yield made
    for engine in made.values():
        engine.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_config_reads_the_family_features(family):
    model, ref = family
    c, want = model.config, ref["expect"]
    got = dict(qkv_bias=c.qkv_bias, o_bias=c.o_bias, qk_norm=c.qk_norm,
               sliding_window=c.sliding_window, tie_word_embeddings=c.tie_word_embeddings,
               rope_kind=c.rope_scaling.kind if c.rope_scaling else None,
               rope_theta=c.rope_theta)
    assert got == want
    assert c.tie_word_embeddings == ("lm_head" not in model.params["params"])


def assert_matches_reference(model, ref) -> None:
    """One forward over prompt + greedy continuation (the reference's cases in one ragged
    step): the logits at the stored steps, and the argmax at every step, are transformers'."""
    c = model.config
    seqs = [case["prompt_ids"] + case["greedy_ids"][:-1] for case in ref["cases"]]
    page_size, start = 8, 0
    table = []
    for seq in seqs:
        n = -(-len(seq) // page_size)
        table.append(list(range(start, start + n)))
        start += n
    width = max(map(len, table))
    table = [row + [0] * (width - len(row)) for row in table]
    logits, _ = run_model(Llama(c), model.params, c, seqs, [0] * len(seqs), table,
                          num_pages=start, page_size=page_size)
    row = 0
    for case, seq in zip(ref["cases"], seqs):
        first = row + len(case["prompt_ids"]) - 1          # the logits of generated step 0
        ours = logits[first:row + len(seq)]
        assert ours.argmax(-1).tolist() == case["greedy_ids"]
        for step, want in zip(case["logit_steps"], case["logits"]):
            np.testing.assert_allclose(ours[step], np.asarray(want, np.float32),
                                       atol=LOGITS_ATOL, rtol=0)
        row += len(seq)


def test_logits_match_transformers(family):
    assert_matches_reference(*family)


@pytest.mark.slow
def test_engine_greedy_matches_transformers(family, engines):
    """Through the engine: chunked prefill, paged decode one token at a time."""
    _, ref = family
    for case in ref["cases"]:
        out = engines["stateful"].generate(case["prompt_ids"], greedy(len(case["greedy_ids"])))
        assert out == case["greedy_ids"]


def test_stateful_equals_stateless(family, engines):
    """A three-turn conversation: each later turn from the cache (stateful) equals a fresh
    recomputation of the whole history (stateless). For mistral it runs far past the window."""
    model, ref = family
    rng = np.random.default_rng(7)
    prompt = ref["cases"][0]["prompt_ids"]
    news = [prompt] + [rng.integers(0, 259, n).tolist() for n in (11, 6)]
    history, stateful, stateless = [], [], []
    hits_before = engines["stateful"].stats()["hit_tokens"]
    for new in news:
        history = history + new
        a = engines["stateful"].submit(history, greedy(12), conversation_id="talk").result()
        b = engines["stateless"].generate(history, greedy(12))
        stateful.append(list(a.token_ids))
        stateless.append(b)
        history = history + list(a.token_ids)
    assert stateful == stateless
    # the later turns came from the cache; the stateless engine recomputed everything
    assert engines["stateful"].stats()["hit_tokens"] - hits_before > len(prompt) + 12
    assert engines["stateless"].stats()["hit_tokens"] == 0
    c = model.config
    if c.sliding_window is not None:
        assert len(history) > 4 * c.sliding_window
    if c.rope_scaling is not None and c.rope_scaling.kind == "dynamic":
        assert len(history) > 2 * c.rope_scaling.original_max_position_embeddings
