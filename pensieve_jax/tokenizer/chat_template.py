"""Chat templates, rendered the way Hugging Face transformers renders them, and which parts of
the text came from the messages.

The Jinja environment is transformers': sandboxed, `trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension ({% break %}, {% continue %}), `{% generation %}` blocks,
`raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` that keeps non-ASCII text and takes
`indent`, `separators`, `sort_keys` and `ensure_ascii`. The template sees `messages`,
`add_generation_prompt`, `tools` and `documents` (None unless given), `bos_token`, `eos_token`
and any extra variables.

Special-token text inside message data (content, tool descriptions, any string the caller
passes) must not become control tokens: `render_parts` renders the template twice, once as
given and once with the first character of every special-token string in that data replaced,
and reports where the two differ (`RenderedChat.plain_spans`): the encoder reads those ranges
as plain text, so only the template's own text produces control tokens.
"""

from __future__ import annotations

import difflib
import json
import re
from datetime import datetime
from typing import Any, Iterable, NamedTuple, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from pensieve_jax.tokenizer.errors import TokenizerError, clip

# Stands in for the first character of special-token text in message data (a private-use
# character: no special token starts with it, and it is not whitespace, so `trim` is unchanged).
DEFANG = "\ue000"


class RenderedChat(NamedTuple):
    """A chat template's text, and the character ranges [start, end) of it that are special-
    token text written by the messages (not by the template): to be tokenized as plain text."""
    text: str
    plain_spans: tuple[tuple[int, int], ...] = ()


class GenerationBlock(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks the assistant's text
    for training masks): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("render_body"), [], [], body,
                                      lineno=lineno)

    def render_body(self, caller):
        return caller()


def raise_exception(message: str):
    raise TokenizerError(f"chat template error: {clip(str(message))}")


def strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
           separators: Sequence[str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators is not None else None,
                      sort_keys=sort_keys)


def environment() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. special_tokens: the special-token strings of the vocabulary
    (what message data may not produce)."""

    def __init__(self, source: str, special_tokens: Iterable[str] = ()):
        self.source = source
        specials = sorted({s for s in special_tokens if s}, key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, specials))) if specials else None
        try:
            self._template = environment().from_string(source)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template does not compile: {clip(str(e))}") from e

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The template's text over `messages`; variables: bos_token, eos_token, tools, ..."""
        values = {"tools": None, "documents": None, **variables, "messages": list(messages),
                  "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**values)
        except TokenizerError:
            raise
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template error: {clip(str(e))}") from e
        except Exception as e:      # the template's own code: a TypeError, a bad index...
            raise TokenizerError(f"chat template failed: {type(e).__name__}: "
                                 f"{clip(str(e))}") from e

    def render_parts(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                     *, trusted: dict[str, Any] | None = None, **data: Any) -> RenderedChat:
        """The text, and the special-token text in it that came from `messages` or `data`
        (extra variables such as tools). `trusted` variables (bos_token, eos_token) are the
        caller's own: their special tokens count as the template's."""
        trusted = trusted or {}
        text = self.render(messages, add_generation_prompt, **{**trusted, **data})
        if self._special is None:
            return RenderedChat(text)
        defanged, changed = self._defang([list(messages), data])
        if not changed:
            return RenderedChat(text)
        messages_b, data_b = defanged
        other = self.render(messages_b, add_generation_prompt, **{**trusted, **data_b})
        return RenderedChat(text, self._written_by_data(text, other))

    def _defang(self, value: Any) -> tuple[Any, bool]:
        """`value` with the special-token strings in its strings (and keys) broken."""
        if isinstance(value, str):
            out = self._special.sub(lambda m: DEFANG + m.group()[1:], value)
            return out, out != value
        if isinstance(value, dict):
            items = [(self._defang(k), self._defang(v)) for k, v in value.items()]
            return ({k: v for (k, _), (v, _) in items},
                    any(ck or cv for (_, ck), (_, cv) in items))
        if isinstance(value, (list, tuple)):
            items = [self._defang(v) for v in value]
            return type(value)(v for v, _ in items), any(c for _, c in items)
        return value, False

    def _written_by_data(self, text: str, other: str) -> tuple[tuple[int, int], ...]:
        """Special-token matches in `text` that the defanged rendering `other` lacks."""
        matches = [(m.start(), m.end()) for m in self._special.finditer(text)]
        if len(other) == len(text):
            spans = tuple((s, e) for s, e in matches if other[s:e] != text[s:e])
            expected = list(text)
            for s, _ in spans:
                expected[s] = DEFANG
            if "".join(expected) == other:   # the renderings differ exactly there
                return spans
        # the template did something else with the data (a length, a branch): align the two
        blocks = difflib.SequenceMatcher(None, text, other, autojunk=False).get_matching_blocks()
        same = [(a, a + n) for a, _, n in blocks if n]
        return tuple((s, e) for s, e in matches if not any(a <= s and e <= b for a, b in same))
