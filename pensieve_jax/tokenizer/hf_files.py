"""A tokenizer from a Hugging Face directory's files: tokenizer.json, tokenizer_config.json,
generation_config.json and chat_template.jinja."""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer as HFTokenizer


def hf_backend(tokenizer_json: str, tokenizer_config: dict[str, Any],
               generation_config: dict[str, Any] | None = None,
               chat_template: str | None = None) -> tuple[HFTokenizer, dict[str, Any]]:
    """(tokenizers backend, Tokenizer settings). The post-processor is dropped: BOS and EOS
    are added by the Tokenizer (add_bos_token / add_eos_token), as the config says, else as
    the post-processor did. chat_template (chat_template.jinja) replaces the config's."""
    backend = HFTokenizer.from_str(tokenizer_json)
    adds = template_adds(json.loads(tokenizer_json).get("post_processor"))
    backend.post_processor = None

    def token_id(key):
        tok = tokenizer_config.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return backend.token_to_id(tok) if tok else None

    def flag(key, position, token):
        value = tokenizer_config.get(key)
        if value is not None:
            return bool(value)
        return token is not None and (position, backend.id_to_token(token)) in adds

    template = chat_template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    gen_eos = (generation_config or {}).get("eos_token_id")
    stops = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
    bos, eos = token_id("bos_token"), token_id("eos_token")
    return backend, dict(bos_token_id=bos, eos_token_id=eos, chat_template=template,
                         add_bos_token=flag("add_bos_token", 0, bos),
                         add_eos_token=flag("add_eos_token", -1, eos), stop_token_ids=stops)


def template_adds(post_processor: dict[str, Any] | None) -> set[tuple[int, str]]:
    """(position, token) pairs a tokenizer.json TemplateProcessing adds around a single text:
    (0, bos) when it prepends one, (-1, eos) when it appends one."""
    procs = [] if post_processor is None else post_processor.get("processors", [post_processor])
    single = next((p.get("single", []) for p in procs if p.get("type") == "TemplateProcessing"),
                  [])
    ends = [(0, single[0]), (-1, single[-1])] if single else []
    return {(pos, item["SpecialToken"]["id"]) for pos, item in ends if "SpecialToken" in item}
