"""The files of benchmarks/eval_conversations.py: the input (one conversation a line, in any
of the shapes its --help shows, parsed into EvalConversation) and the output (one record a
line, appended and flushed by ReplyWriter; completed_ids() reads back what is already done,
cutting off a line a kill left unfinished).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

ASSISTANT_ROLES = {"assistant", "gpt", "chatgpt", "bard", "model"}
USER_ROLES = {"user", "human"}


@dataclasses.dataclass(frozen=True)
class EvalConversation:
    id: str
    system: str | None
    turns: tuple[str, ...]
    max_tokens: int | None = None


def parse_conversation(record: dict, line_no: int) -> EvalConversation:
    """One input line as an EvalConversation; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"line {line_no}: expected a JSON object, got {type(record).__name__}")
    cid = str(record["id"]) if record.get("id") is not None else f"line-{line_no}"
    system = record.get("system")
    if "turns" in record:
        turns = record["turns"]
        if isinstance(turns, str) or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"line {line_no}: 'turns' must be a list of strings")
        turns = list(turns)
    else:
        messages = record.get("messages") or record.get("conversations") or \
            record.get("conversation")
        if not isinstance(messages, list):
            raise ValueError(f"line {line_no}: needs 'turns', 'messages' or 'conversations'")
        turns = []
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(f"line {line_no}: a message must be an object, got {m!r}")
            role = str(m.get("role", m.get("from", ""))).lower()
            content = m.get("content", m.get("value"))
            if not isinstance(content, str):
                raise ValueError(f"line {line_no}: message content must be a string")
            if role == "system":
                system = content if system is None else system + "\n" + content
            elif role in USER_ROLES:
                turns.append(content)
            elif role not in ASSISTANT_ROLES:
                raise ValueError(f"line {line_no}: unknown role {role!r}")
    turns = [t for t in turns if t.strip()]
    if not turns:
        raise ValueError(f"line {line_no}: conversation {cid!r} has no user turns")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"line {line_no}: 'system' must be a string")
    max_tokens = record.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"line {line_no}: max_tokens must be a positive integer")
    return EvalConversation(cid, system, tuple(turns), max_tokens)


def read_conversations(path: str | Path) -> list[EvalConversation]:
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            conv = parse_conversation(record, n)
            if conv.id in seen:
                raise ValueError(f"{path}:{n}: duplicate conversation id {conv.id!r}")
            seen.add(conv.id)
            out.append(conv)
    return out


def completed_ids(path: str | Path) -> set[str]:
    """Ids already in the output. A last line without its newline (the run was killed while
    writing it) is cut off the file so the conversation runs again."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"warning: {path}:{n} is not an output record; ignored", file=sys.stderr)
    return done


class ReplyWriter:
    """Appends output records (with `extra` keys, e.g. the model) one line each, flushed (and
    fsynced when asked) as each is written; safe to call from several threads."""

    def __init__(self, path: Path, fsync: bool, extra: dict[str, Any]):
        self.f = open(path, "a", encoding="utf-8")
        self.fsync = fsync
        self.extra = extra
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({**record, **self.extra}, ensure_ascii=False) + "\n"
        with self.lock:
            self.f.write(line)
            self.f.flush()
            if self.fsync:
                os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
