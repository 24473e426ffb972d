"""Tokenizer backends from GGUF metadata: the `tokenizer.ggml.*` keys llama.cpp writes.

- "gpt2": byte-level BPE with the file's merges and the split its `tokenizer.ggml.pre` names
  (gguf_pre.py: GPT-2, Llama 3, SmolLM2, Qwen2/2.5/3, Qwen3.5...).
- "llama": SentencePiece BPE (Llama 2, Mistral) as llama.cpp runs it: spaces become '▁', a
  '▁' is prepended to the text and to each piece after a control or user-defined token
  (`tokenizer.ggml.add_space_prefix`, default true), pieces merge best-score first, and
  characters outside the vocabulary fall back to <0xNN> byte tokens. The merges are recovered
  from the scores: every split of a normal token into two normal tokens, ranked by the
  token's score (SentencePiece merges the pair whose joined piece scores best).

Token types (llama.cpp): control and unknown tokens are special tokens (matched whole in raw
text, skipped when decoding with skip_special_tokens, never produced by plain text);
user-defined ones are matched whole but are not special.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

from pensieve_jax.tokenizer.errors import TokenizerError
from pensieve_jax.tokenizer.gguf_pre import byte_level_split

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SUPPORTED_MODELS = ("gpt2", "llama")


def gguf_backend(meta: dict[str, Any]) -> tuple[HFTokenizer, dict[str, Any]]:
    """(tokenizers backend, Tokenizer settings: special ids, template, add_bos/eos, stops)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_MODELS:
        raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} (supported: "
                             f"{', '.join(SUPPORTED_MODELS)}: byte-level BPE and SentencePiece "
                             "BPE); use a Hugging Face directory with tokenizer.json instead")
    tokens = _required(meta, "tokenizer.ggml.tokens")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for "
                             f"{len(tokens)} tokens")
    backend = _byte_level(meta, tokens) if kind == "gpt2" else _sentencepiece(meta, tokens, types)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == USER_DEFINED])
    stops = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
             if k in meta]
    return backend, dict(
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        stop_token_ids=stops)


def _required(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise TokenizerError(f"GGUF tokenizer metadata lacks {key}")
    return meta[key]


def _byte_level(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    split = byte_level_split(meta.get("tokenizer.ggml.pre", "default"))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                     ignore_merges=split.ignore_merges))
    backend.normalizer = split.normalizer()
    backend.pre_tokenizer = split.pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]) -> HFTokenizer:
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    if len(scores) != len(tokens):
        raise TokenizerError(f"GGUF tokenizer.ggml.scores has {len(scores)} entries for "
                             f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    backend = HFTokenizer(models.BPE(
        vocab=vocab, merges=sentencepiece_merges(tokens, scores, types),
        unk_token=tokens[unk] if unk is not None else None, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def sentencepiece_merges(tokens: list[str], scores: list[float],
                         types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's best-score-first merging: each split of a
    normal token into two normal tokens, the best-scoring joined token first."""
    normal = {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind == NORMAL and t not in normal:
            normal[t] = (float(scores[i]), i)
    ranked = []
    for token, (score, i) in normal.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, normal[left][1], left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]
