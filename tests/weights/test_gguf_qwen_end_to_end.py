"""A whole Qwen2 GGUF file end to end: the qwen2 family fixture's checkpoint (tests/fixtures/
families/qwen2) with the Qwen2-style tokenizer fixture (tests/fixtures/tokenizers/qwen2, whose
512 tokens fit the checkpoint's vocabulary), once as a Hugging Face directory and once as the
GGUF file llama.cpp's converter would write (architecture qwen2, tokenizer.ggml.pre "qwen2").
Loaded through load_model, both give the same config, weights, chat ids, logits and, through
the engine, the same greedy replies; the GGUF model also reproduces transformers' tokens."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import FIXTURES, run_model
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.model.llama import Llama
from pensieve_jax.weights import load_model
from tests.weights.test_gguf_families import write_family_gguf

FAMILY, TOKENIZER = FIXTURES / "families" / "qwen2", FIXTURES / "tokenizers" / "qwen2"
CHATS = [
    [{"role": "system", "content": "You count: 12345 and 2026."},
     {"role": "user", "content": "I'VE got <|im_start|>user in my text, naïve 日本 🙂"}],
    [{"role": "user", "content": "नमस्ते  दुनिया\n\n"}, {"role": "assistant", "content": "<think>x</think>42"},
     {"role": "user", "content": "cafe\u0301?"}],
]
ENGINE = dict(max_model_len=160, page_size=8, max_batched_tokens=16, max_num_seqs=2,
              num_pages=48)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"gguf": ..., "hf": ...}: the same checkpoint and tokenizer from both formats."""
    tmp = tmp_path_factory.mktemp("qwen2-e2e")
    hf = tmp / "hf"
    hf.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FAMILY / f, hf / f)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, hf / f)
    ref = write_family_gguf(tmp / "qwen2.gguf", "qwen2", "qwen2",
                            tokenizer_from=FIXTURES / "tokenizers" / "qwen2.gguf")
    loaded = {"gguf": load_model(str(tmp / "qwen2.gguf"), "float32", cache_dir=False),
              "hf": load_model(str(hf), "float32", cache_dir=False)}
    return loaded, ref


def leaves(params, prefix=""):
    if isinstance(params, dict):
        for k, v in sorted(params.items()):
            yield from leaves(v, f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(params)


def test_same_config_weights_and_chat_ids(models):
    loaded, _ = models
    g, h = loaded["gguf"], loaded["hf"]
    assert g.config.vocab_size == h.config.vocab_size == g.tokenizer.vocab_size == 512
    fields = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
              "qkv_bias", "o_bias", "qk_norm", "tie_word_embeddings")
    assert [getattr(g.config, f) for f in fields] == [getattr(h.config, f) for f in fields]
    # GGUF stores the epsilon as float32 (1e-6 reads back 9.99999997e-07): the same in compute
    assert np.float32(g.config.rms_norm_eps) == np.float32(h.config.rms_norm_eps)
    g_leaves, h_leaves = dict(leaves(g.params)), dict(leaves(h.params))
    assert g_leaves.keys() == h_leaves.keys()
    for name, value in g_leaves.items():
        np.testing.assert_array_equal(value, h_leaves[name], err_msg=name)
    for messages in CHATS:
        assert g.tokenizer.apply_chat_template(messages) == \
            h.tokenizer.apply_chat_template(messages)
    assert g.tokenizer.stop_token_ids == h.tokenizer.stop_token_ids


def test_same_logits_on_chat_prompts(models):
    loaded, _ = models
    seqs = [loaded["gguf"].tokenizer.apply_chat_template(m) for m in CHATS]
    page_size = 8
    pages = [-(-len(s) // page_size) for s in seqs]
    table = [list(range(sum(pages[:i]), sum(pages[:i + 1]))) + [0] * (max(pages) - n)
             for i, n in enumerate(pages)]
    out = {}
    for kind, model in loaded.items():
        c = model.config
        out[kind], _ = run_model(Llama(c), model.params, c, seqs, [0] * len(seqs), table,
                                 num_pages=sum(pages), page_size=page_size)
    assert np.isfinite(out["gguf"]).all()
    np.testing.assert_array_equal(out["gguf"], out["hf"])


@pytest.mark.slow
def test_engine_replies_match(models):
    """Through the engine: transformers' greedy tokens from the GGUF model, and a two-turn
    chat (the GGUF tokenizer's template, cached history) with the same replies as the
    Hugging Face directory's."""
    loaded, ref = models
    replies = {}
    for kind, model in loaded.items():
        engine = Engine(model, "float32", EngineConfig(**ENGINE))
        try:
            if kind == "gguf":
                case = ref["cases"][0]
                greedy = SamplingParams(max_tokens=len(case["greedy_ids"]), temperature=0.0,
                                        ignore_eos=True)
                assert engine.generate(case["prompt_ids"], greedy) == case["greedy_ids"]
            params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
            session = engine.session(system="You count: 12345 and 2026.")
            turns = [session.send("I'VE got <|im_start|>user in my text 🙂", params),
                     session.send("नमस्ते cafe\u0301?", params)]
            replies[kind] = ([(r.token_ids, r.text) for r in turns], session.token_ids)
        finally:
            engine.shutdown()
    assert replies["gguf"] == replies["hf"]
    assert all(len(ids) == 10 for ids, _ in replies["gguf"][0])
