"""Encoding text where some ranges are plain text, or that continues an earlier encoding.

The tokenizers library first splits a text at its added tokens, then normalizes, pre-tokenizes
and runs the model on each piece between them. Two things a chat needs on top of that:

- plain spans: special-token text written by a user (inside message content) is read as
  characters, not as the control token. The text is encoded as usual; if a special token came
  from a plain span, the text is cut at the other special tokens only, and the pieces between
  them are encoded with special-token matching off. (Added tokens that are not special, such
  as user-defined ones, are matched in plain text too, as transformers and llama.cpp do.)
- continuation: the rest of a conversation, after the ids a previous turn already holds, is
  encoded as a piece that follows a token boundary (like the piece after a special token),
  not as the start of a text. This matters for SentencePiece-style vocabularies whose
  `Metaspace` pre-tokenizer adds the '▁' prefix only at the start of the text
  (`prepend_scheme: first`): a continuation gets none.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from tokenizers import Tokenizer as HFTokenizer


def walk(node: Any):
    """Every dict inside a tokenizer.json component."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def component(backend: HFTokenizer, name: str) -> Any:
    part = getattr(backend, name)
    return None if part is None else json.loads(part.__getstate__())


def overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(start < b and a < end for a, b in spans)


class SegmentEncoder:
    """Encodes with `backend`, honouring plain spans and continuation (module docstring).

    segment_prefix: whether every piece between added tokens gets its own '▁' prefix (a
    `Prepend` normalizer, the legacy Llama/Mistral tokenizer.json, or `Metaspace` with
    prepend_scheme `always`); then text is recovered from ids piece by piece (`text_of`)."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items()
                                     if t.special)
        self.added_ids = frozenset(backend.get_added_tokens_decoder())
        pre, norm = component(backend, "pre_tokenizer"), component(backend, "normalizer")
        schemes = {d.get("prepend_scheme") for d in walk(pre) if d.get("type") == "Metaspace"}
        self.prefix_first_only = "first" in schemes
        self.segment_prefix = "always" in schemes or any(d.get("type") == "Prepend"
                                                          for d in walk(norm))
        self._variants: dict[tuple[bool, bool], HFTokenizer] = {}

    def encode(self, text: str, plain_spans: Sequence[tuple[int, int]] = (),
               continuation: bool = False) -> list[int]:
        enc = self._variant(plain=False, first=not continuation).encode(
            text, add_special_tokens=False)
        if not plain_spans or not any(i in self.special_ids and overlaps(s, e, plain_spans)
                                      for i, (s, e) in zip(enc.ids, enc.offsets)):
            return enc.ids
        ids, start = [], 0
        for i, (s, e) in zip(enc.ids, enc.offsets):
            if i in self.special_ids and not overlaps(s, e, plain_spans):
                ids += self._plain(text[start:s], first=start == 0 and not continuation)
                ids.append(i)
                start = e
        return ids + self._plain(text[start:], first=start == 0 and not continuation)

    def text_of(self, ids: Sequence[int]) -> str:
        """The text `ids` encode, as a rendering holds it (special tokens as their text)."""
        if not self.segment_prefix:
            return self.backend.decode(ids, skip_special_tokens=False)
        out, run = [], []
        for i in ids:
            if i in self.added_ids:
                out += [self.backend.decode(run, skip_special_tokens=False),
                        self.backend.decode([i], skip_special_tokens=False)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.backend.decode(run, skip_special_tokens=False)

    def _plain(self, text: str, first: bool) -> list[int]:
        if not text:
            return []
        return self._variant(plain=True, first=first).encode(text, add_special_tokens=False).ids

    def _variant(self, plain: bool, first: bool) -> HFTokenizer:
        """The backend, or a copy that reads special tokens as text (plain) and/or adds no
        start-of-text '▁' (not first); built once, when first needed."""
        first = first or not self.prefix_first_only
        if not plain and first:
            return self.backend
        key = (plain, first)
        if key not in self._variants:
            config = json.loads(self.backend.to_str())
            if not first:
                for d in walk(config.get("pre_tokenizer")):
                    if d.get("type") == "Metaspace" and d.get("prepend_scheme") == "first":
                        d["prepend_scheme"] = "never"
            variant = HFTokenizer.from_str(json.dumps(config))
            variant.encode_special_tokens = plain
            self._variants[key] = variant
        return self._variants[key]
