"""The model's tokenizer: encode/decode, special ids, and the chat template.

Runs on the `tokenizers` library: byte-level BPE (Llama 3, Qwen, SmolLM2) and SentencePiece-
style BPE with byte fallback (Llama 2, Mistral), from a Hugging Face `tokenizer.json` or from
GGUF metadata (gguf_vocab.py). Chat templates render as transformers renders them
(chat_template.py).

Message content is plain text: special-token text a user writes ("<|im_start|>system") is
tokenized as characters, never as a control token; only the template's own text produces
those. Trusted callers may pass allow_special_tokens=True. `encode(text)` on raw text matches
special tokens (a raw prompt is the caller's own).
"""

from __future__ import annotations

from typing import Any, Sequence

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from pensieve_jax.tokenizer.chat_template import ChatTemplate, RenderedChat
from pensieve_jax.tokenizer.errors import TokenizerError, clip
from pensieve_jax.tokenizer.gguf_vocab import gguf_backend
from pensieve_jax.tokenizer.hf_files import hf_backend
from pensieve_jax.tokenizer.segments import SegmentEncoder
from pensieve_jax.tokenizer.text_stream import TextStream

Messages = Sequence[dict[str, Any]]


class Tokenizer:
    """encode/decode and the model's chat template.

    stop_token_ids: ids that end generation (eos, end-of-turn), used by the engine by default.
    add_bos_token / add_eos_token: what encode(text, add_special_tokens=True) adds.
    """

    def __init__(self, backend: HFTokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 chat_template: str | None, add_bos_token: bool = False,
                 add_eos_token: bool = False, stop_token_ids: Sequence[int] = ()):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        stops = list(stop_token_ids) + ([eos_token_id] if eos_token_id is not None else [])
        self.stop_token_ids = tuple(sorted(set(stops)))
        self._segments = SegmentEncoder(backend)
        self._template: ChatTemplate | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens: the chat template's own text may produce them,
        message content does not (it is matched as plain text)."""
        return self._segments.special_ids

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    def encode(self, text: str, add_special_tokens: bool = False, *,
               plain_spans: Sequence[tuple[int, int]] = (), continuation: bool = False
               ) -> list[int]:
        """Token ids of `text`; special-token strings in it are matched as special tokens,
        except inside `plain_spans` (character ranges [start, end) read as plain text).

        add_special_tokens: add BOS (and EOS) when the model's tokenizer says so.
        continuation: `text` continues an earlier encoding after a token boundary (as the text
        after a special token does), rather than starting a text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._segments.encode(text, plain_spans, continuation)
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def text_stream(self, skip_special_tokens: bool = True) -> TextStream:
        """Incremental decoding of a growing reply, one token at a time (TextStream)."""
        return TextStream(self.backend, skip_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(self._checked(ids), skip_special_tokens=skip_special_tokens)

    def _checked(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        """The chat template's text over `messages` (extra: tools, documents, ...)."""
        return self._chat().render(self._checked_messages(messages), add_generation_prompt,
                                   **{**self._template_tokens(), **extra})

    def render_chat_parts(self, messages: Messages, add_generation_prompt: bool = True, *,
                          allow_special_tokens: bool = False, **extra: Any) -> RenderedChat:
        """The template's text and the ranges of it to encode as plain text: special-token
        text that the messages or `extra` wrote (none with allow_special_tokens)."""
        messages = self._checked_messages(messages)
        if allow_special_tokens:
            return RenderedChat(self.render_chat(messages, add_generation_prompt, **extra))
        return self._chat().render_parts(messages, add_generation_prompt,
                                         trusted=self._template_tokens(), **extra)

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True, *,
                    prefix_ids: Sequence[int] = (), allow_special_tokens: bool = False,
                    **extra: Any) -> list[int]:
        """Token ids of the chat template over `messages`, message content as plain text.

        prefix_ids: the conversation's exact ids so far (earlier prompts and generated tokens).
        When the text they stand for starts the rendering, the result is prefix_ids plus the
        rest of the rendering encoded as its continuation, so a turn extends the cached ids;
        otherwise (the template rewrote the history) the whole rendering is encoded.
        """
        chat = self.render_chat_parts(messages, add_generation_prompt,
                                      allow_special_tokens=allow_special_tokens, **extra)
        prefix = self._checked(prefix_ids)
        seen = self._segments.text_of(prefix) if prefix else ""
        if not prefix or not chat.text.startswith(seen):
            return self.encode(chat.text, plain_spans=chat.plain_spans)
        cut = len(seen)
        spans = [(max(s, cut) - cut, e - cut) for s, e in chat.plain_spans if e > cut]
        return prefix + self.encode(chat.text[cut:], plain_spans=spans, continuation=True)

    def continuation_text(self, prefix_ids: Sequence[int], ids: Sequence[int]) -> str:
        """The text `ids` add after `prefix_ids` in a rendering, special tokens included: e.g.
        a reply as the next turn's template should show it. (decode(ids) alone drops the space
        a SentencePiece vocabulary writes as '▁' at the start of a word: " Hello" vs "Hello".)"""
        prefix, ids = self._checked(prefix_ids), self._checked(ids)
        return self._segments.text_of(prefix + ids)[len(self._segments.text_of(prefix)):]

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True, *,
                            allow_special_tokens: bool = False, **extra: Any) -> list[int]:
        """encode_chat without a prefix: the ids of a whole conversation."""
        return self.encode_chat(messages, add_generation_prompt,
                                allow_special_tokens=allow_special_tokens, **extra)

    def _chat(self) -> ChatTemplate:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use encode() on raw text")
        if self._template is None or self._template.source != self.chat_template:
            specials = [self.token_text(i) for i in sorted(self.special_token_ids)]
            self._template = ChatTemplate(self.chat_template, specials)
        return self._template

    def _template_tokens(self) -> dict[str, str]:
        return {"bos_token": self.token_text(self.bos_token_id),
                "eos_token": self.token_text(self.eos_token_id)}

    @staticmethod
    def _checked_messages(messages: Messages) -> list[dict[str, Any]]:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and 'content': "
                                     f"{clip(repr(m), 100)}")
        return list(messages)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """From GGUF `tokenizer.ggml.*` metadata: byte-level BPE or SentencePiece (gguf_vocab)."""
        backend, settings = gguf_backend(meta)
        return cls(backend, **settings)

    @classmethod
    def from_hf_files(cls, tokenizer_json: str, tokenizer_config: dict[str, Any],
                      generation_config: dict[str, Any] | None = None,
                      chat_template: str | None = None) -> "Tokenizer":
        """From a Hugging Face directory's files; chat_template: the text of its
        chat_template.jinja, where it has one (it replaces the config's template)."""
        backend, settings = hf_backend(tokenizer_json, tokenizer_config, generation_config,
                                       chat_template)
        return cls(backend, **settings)

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
            "add_eos_token": self.add_eos_token, "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_saved(cls, tokenizer_json: str, settings: dict[str, Any]) -> "Tokenizer":
        return cls(HFTokenizer.from_str(tokenizer_json), **settings)

