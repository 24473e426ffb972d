"""A reply's text, decoded as its tokens come."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21 (e.g. an image installed before it): TextStream decodes
    DecodeStream = None  # the whole reply each token instead


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
