"""Tokenizer and chat template: built from GGUF metadata or a Hugging Face `tokenizer.json`.

Byte-level BPE runs in the `tokenizers` library; chat templates render with jinja2 the way
Hugging Face renders them (sandboxed, trim_blocks, lstrip_blocks, `raise_exception`).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21 (e.g. an image installed before it): TextStream decodes
    DecodeStream = None  # the whole reply each token instead

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (the split llama.cpp applies before BPE).
_GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                   r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva")
_LLAMA3_LIKE = ("llama-bpe", "llama3", "dbrx", "smaug-bpe")

# GGUF token types (llama.cpp): 3 = control, 4 = user defined; both are matched as whole tokens.
_CONTROL, _USER_DEFINED = 3, 4


class TokenizerError(ValueError):
    pass


def _byte_level_pre_tokenizer(pre: str):
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _LLAMA3_LIKE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("gpt2", "default", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: gpt2, "
                         f"{', '.join(_DIGITS_THEN_GPT2 + _LLAMA3_LIKE)})")


class Tokenizer:
    """encode/decode and the model's chat template.

    stop_token_ids: ids that end generation (eos, end-of-turn), used by the engine by default.
    """

    def __init__(self, backend: HFTokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 chat_template: str | None, add_bos_token: bool = False,
                 stop_token_ids: Sequence[int] = ()):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        stops = list(stop_token_ids) + ([eos_token_id] if eos_token_id is not None else [])
        self.stop_token_ids = tuple(sorted(set(stops)))
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it are matched as special tokens.

        add_special_tokens: prepend BOS when the model's tokenizer says so.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def text_stream(self, skip_special_tokens: bool = True) -> "TextStream":
        """Incremental decoding of a growing reply, one token at a time (TextStream)."""
        return TextStream(self.backend, skip_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use encode() on raw text")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and 'content': {m!r}")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                      indent=indent)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=list(messages),
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=self.token_text(self.bos_token_id),
                                     eos_token=self.token_text(self.eos_token_id), **extra)

    def apply_chat_template(self, messages: Sequence[dict[str, str]],
                            add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE "
                                 "('gpt2') is built from GGUF metadata; use a Hugging Face "
                                 "directory with tokenizer.json for other tokenizers")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                         ignore_merges=meta.get("tokenizer.ggml.pre") in _LLAMA3_LIKE))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(tokens[i], special=True, normalized=False)
                    for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
        backend.add_special_tokens(specials)
        stops = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                 if k in meta]
        return cls(backend, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   stop_token_ids=stops)

    @classmethod
    def from_hf_files(cls, tokenizer_json: str, tokenizer_config: dict[str, Any],
                      generation_config: dict[str, Any] | None = None) -> "Tokenizer":
        backend = HFTokenizer.from_str(tokenizer_json)
        # The HF post-processor may add BOS; we decide that ourselves from add_bos_token.
        backend.post_processor = None

        def token_id(key):
            tok = tokenizer_config.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return backend.token_to_id(tok) if tok else None

        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        gen_eos = (generation_config or {}).get("eos_token_id")
        stops = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        return cls(backend, bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"),
                   chat_template=template,
                   add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
                   stop_token_ids=stops)

    @classmethod
    def byte_level(cls, vocab_size: int) -> "Tokenizer":
        """A tokenizer for random-weight models: one token per byte, ChatML specials, and
        filler tokens so that every id below vocab_size decodes."""
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        if vocab_size < 256 + len(specials):
            raise TokenizerError(f"vocab_size {vocab_size} is too small for a byte tokenizer")
        byte_chars = pre_tokenizers.ByteLevel.alphabet()
        byte_chars.sort()
        vocab = {c: i for i, c in enumerate(byte_chars)}
        first_special = len(vocab)
        vocab.update({t: first_special + i for i, t in enumerate(specials)})
        vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), vocab_size)})
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                    "'<|im_end|>\\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
        return cls(backend, bos_token_id=first_special + 1, eos_token_id=first_special + 2,
                   chat_template=template)

    def to_files(self) -> tuple[str, dict[str, Any]]:
        """(tokenizer.json text, settings dict) that `from_saved` restores."""
        return self.backend.to_str(), {
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "chat_template": self.chat_template, "add_bos_token": self.add_bos_token,
            "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_saved(cls, tokenizer_json: str, settings: dict[str, Any]) -> "Tokenizer":
        return cls(HFTokenizer.from_str(tokenizer_json), **settings)


class TextStream:
    """A reply's text as its tokens come, each token decoded once (the tokenizers library's
    DecodeStream): `step(id)` returns the new text ("" while a character is incomplete) and
    `text` is all of it so far, as decode(ids, skip_special_tokens) would give it."""

    def __init__(self, backend: HFTokenizer, skip_special_tokens: bool = True):
        self._backend = backend
        self._skip = skip_special_tokens
        self._stream = None if DecodeStream is None else DecodeStream(
            skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self.text = ""

    def step(self, token_id: int) -> str:
        if self._stream is not None:
            piece = self._stream.step(self._backend, int(token_id)) or ""
        else:
            self._ids.append(int(token_id))
            full = self._backend.decode(self._ids, skip_special_tokens=self._skip)
            piece = "" if full.endswith("\ufffd") else full[len(self.text):]
        self.text += piece
        return piece


def _raise_template_error(message: str):
    raise TokenizerError(f"chat template error: {message}")
