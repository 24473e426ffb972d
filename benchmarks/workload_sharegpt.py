"""ShareGPT-format files for the workloads (benchmarks/workload.py re-exports these):
`[{"id", "conversations": [{"from": "human" | "gpt" | "system", "value": text}]}]` as a JSON list
or JSONL. load_sharegpt() reads one into Conversations (turns keep their text and, with a
tokenizer, their token lengths); write_sharegpt() writes Conversations that carry text.

Only numpy (no jax): a peer process without jax imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from workload_conversations import Conversation, Turn, cap_context

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


def _read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    if stripped.startswith("{") and "\n" not in stripped.strip():
        return [json.loads(text)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def parse_sharegpt_record(record: dict) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system text, [(user text, assistant text or None), ...]) of one ShareGPT record.
    Leading assistant messages are dropped; consecutive messages of one role are joined."""
    system, pairs = None, []
    messages = record.get("conversations") or record.get("conversation") or []
    merged: list[list[str]] = []          # [role, text]
    for m in messages:
        role = str(m.get("from", m.get("role", ""))).lower()
        value = m.get("value", m.get("content"))
        if not isinstance(value, str):
            continue
        if role == "system":
            system = value if system is None else system + "\n" + value
            continue
        role = "user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else None
        if role is None:
            continue
        if merged and merged[-1][0] == role:
            merged[-1][1] += "\n" + value
        else:
            merged.append([role, value])
    while merged and merged[0][0] != "user":
        merged.pop(0)
    for i, (role, text) in enumerate(merged):
        if role == "user":
            nxt = merged[i + 1] if i + 1 < len(merged) else None
            pairs.append((text, nxt[1] if nxt else None))
    return system, pairs


def load_sharegpt(path: str | Path, tokenizer=None, max_conversations: int | None = None,
                  min_turns: int = 1, max_context: int | None = None,
                  default_answer_len: int = 128, skip_empty: bool = True) -> list[Conversation]:
    """Conversations from a ShareGPT-format JSON (a list) or JSONL file.

    With a tokenizer (anything with `encode(text) -> ids`), prompt_len / answer_len are the
    token counts of the texts (answer_len: of the dataset's answer, default_answer_len when a
    conversation ends with a user turn); without one, ~4 characters per token."""
    count: Callable[[str], int] = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None \
        else (lambda s: max(1, round(len(s) / 4)))
    out = []
    for k, rec in enumerate(_read_records(Path(path))):
        system, pairs = parse_sharegpt_record(rec)
        if skip_empty:
            pairs = [(u, a) for u, a in pairs if u.strip()]
        turns = [Turn(max(1, count(u)), max(1, count(a)) if a else default_answer_len, u, a)
                 for u, a in pairs]
        sys_len = count(system) if system else 0
        turns = cap_context(turns, sys_len, max_context)
        if len(turns) < max(1, min_turns):
            continue
        cid = str(rec.get("id", f"sharegpt-file-{k}"))
        out.append(Conversation(cid, tuple(turns), sys_len, system))
        if max_conversations and len(out) >= max_conversations:
            break
    return out


def write_sharegpt(conversations: Sequence[Conversation], path: str | Path) -> None:
    """Write conversations that carry text as a ShareGPT-format JSON list."""
    recs = []
    for c in conversations:
        msgs = [{"from": "system", "value": c.system}] if c.system else []
        for t in c.turns:
            msgs.append({"from": "human", "value": t.text or ""})
            if t.answer is not None:
                msgs.append({"from": "gpt", "value": t.answer})
        recs.append({"id": c.id, "conversations": msgs})
    Path(path).write_text(json.dumps(recs, indent=1), encoding="utf-8")
