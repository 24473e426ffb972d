"""Conversation workloads for the multi-turn benchmarks: what users say, how long the model
answers, when conversations start and how long users think between turns.

    from workload import sharegpt, ultrachat, multi_round_qa, load_sharegpt, schedule

    convs = sharegpt(64, seed=0, scale=0.25)          # synthetic, ShareGPT-shaped
    wl = schedule(convs, rate=2.0, think_time_s=1.0, seed=0)   # Poisson arrivals, think times
    wl.summary()                                       # measured means of what was drawn

Shapes (means from the Pensieve paper's traces; see ../shared/design.md section 6):

    | generator      | turns / conversation | prompt tokens / turn | answer tokens / turn |
    |----------------|----------------------|----------------------|----------------------|
    | sharegpt       | 5.56                 | 37.77                | 204.58               |
    | ultrachat      | 3.86                 | 51.78                | 257.81               |
    | multi_round_qa | `rounds` (fixed)     | `question_len` mean  | `answer_len` (fixed) |
    |                |                      | + a shared system prompt of `system_len` tokens  |

Turn counts are 1 + geometric (mean as above); prompt and answer lengths are log-normal with the
given means (heavy tails, as in the real traces), rounded, at least 1. `scale` multiplies the
length means (not the turn counts) so CPU runs stay small. `max_context` drops the turns of a
conversation from the first one whose history would exceed it (Pensieve caps at 16k tokens),
which lowers the measured means a little: `summary()` reports what was drawn.

Timing (`schedule`): conversations arrive as a Poisson process of `rate` conversations/s (rate
inf: all at once); each one is a closed-loop user who sends a turn, waits for the whole answer,
thinks for an exponential time (mean `think_time_s`), then sends the next turn. All draws come
from the seed, so two replays of one Workload (one per cache policy) see the same work.

`load_sharegpt(path)` reads a ShareGPT-format JSON / JSONL file (`[{"id", "conversations":
[{"from": "human" | "gpt" | "system", "value": text}]}]`); turns keep their text and, with a
tokenizer, their token lengths.

This module needs only numpy (no jax), so a peer process without jax can import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

SHAREGPT = {"turns": 5.56, "prompt": 37.77, "answer": 204.58}
ULTRACHAT = {"turns": 3.86, "prompt": 51.78, "answer": 257.81}
PROMPT_SIGMA = 0.8      # log-normal shape of user prompts (heavy-tailed)
ANSWER_SIGMA = 0.6      # ... and of answers


@dataclasses.dataclass(frozen=True)
class Turn:
    prompt_len: int                 # new user tokens this turn (token-level replay)
    answer_len: int                 # tokens to generate (max_tokens; ignore_eos in token mode)
    text: str | None = None         # the user's message (text mode)
    answer: str | None = None       # the dataset's answer (text mode; informative only)


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    system_len: int = 0             # system prompt tokens before the first turn
    system: str | None = None       # its text (text mode)
    system_key: str | None = None   # conversations with the same key share the system prompt

    def context_len(self) -> int:
        return self.system_len + sum(t.prompt_len + t.answer_len for t in self.turns)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Conversations with their arrival times and per-turn think times (think_s[i][k] is the
    pause before turn k of conversation i; think_s[i][0] is 0)."""
    name: str
    conversations: tuple[Conversation, ...]
    arrivals_s: tuple[float, ...]
    think_s: tuple[tuple[float, ...], ...]
    rate: float
    think_time_s: float
    seed: int

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def num_turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "rate_conversations_per_s": self.rate,
                "think_time_s": self.think_time_s, "seed": self.seed,
                **summarize(self.conversations)}


def summarize(conversations: Sequence[Conversation]) -> dict[str, Any]:
    turns = [t for c in conversations for t in c.turns]
    if not turns:
        return {"conversations": len(conversations), "turns": 0}
    ctx = [c.context_len() for c in conversations]
    return {
        "conversations": len(conversations), "turns": len(turns),
        "mean_turns": len(turns) / len(conversations),
        "mean_prompt_tokens": float(np.mean([t.prompt_len for t in turns])),
        "mean_answer_tokens": float(np.mean([t.answer_len for t in turns])),
        "mean_system_tokens": float(np.mean([c.system_len for c in conversations])),
        "mean_context_tokens": float(np.mean(ctx)), "max_context_tokens": int(max(ctx)),
        "max_turns": max(len(c.turns) for c in conversations),
    }


# -- distributions --------------------------------------------------------------------------

def lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, size) -> np.ndarray:
    """Integer lengths >= 1 from a log-normal with the given mean (of the continuous draw)."""
    if sigma <= 0:
        return np.maximum(1, np.rint(np.full(size, mean))).astype(np.int64)
    mu = math.log(mean) - sigma ** 2 / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size))).astype(np.int64)


def turn_counts(rng: np.random.Generator, mean: float, size, max_turns: int | None = None
                ) -> np.ndarray:
    """1 + geometric: support 1, 2, ..., mean `mean` (without a cap)."""
    if mean < 1:
        raise ValueError(f"mean turns must be >= 1, got {mean}")
    n = rng.geometric(1.0 / mean, size)
    return np.minimum(n, max_turns) if max_turns else n


def _cap_context(turns: list[Turn], system_len: int, max_context: int | None) -> list[Turn]:
    if not max_context:
        return turns
    total, kept = system_len, []
    for t in turns:
        total += t.prompt_len + t.answer_len
        if total > max_context:
            break
        kept.append(t)
    return kept


def synthetic(num_conversations: int, *, turns: float, prompt: float, answer: float,
              seed: int = 0, scale: float = 1.0, prompt_sigma: float = PROMPT_SIGMA,
              answer_sigma: float = ANSWER_SIGMA, max_turns: int | None = None,
              max_context: int | None = None, name: str = "synthetic",
              system_len: int = 0) -> list[Conversation]:
    """Conversations with 1 + geometric turn counts (mean `turns`) and log-normal prompt /
    answer lengths (means `prompt * scale`, `answer * scale`). A conversation whose first turn
    alone exceeds max_context is drawn again (so the count is exact)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    rng = np.random.default_rng(seed)
    out: list[Conversation] = []
    while len(out) < num_conversations:
        n = int(turn_counts(rng, turns, 1, max_turns)[0])
        p = lognormal_lengths(rng, prompt * scale, prompt_sigma, n)
        a = lognormal_lengths(rng, answer * scale, answer_sigma, n)
        ts = _cap_context([Turn(int(x), int(y)) for x, y in zip(p, a)], system_len, max_context)
        if ts:
            out.append(Conversation(f"{name}-{seed}-{len(out)}", tuple(ts), system_len))
    return out


def sharegpt(num_conversations: int, seed: int = 0, scale: float = 1.0, **kw) -> list[Conversation]:
    """ShareGPT-shaped conversations: 5.56 turns, 37.77 prompt and 204.58 answer tokens/turn."""
    return synthetic(num_conversations, **SHAREGPT, seed=seed, scale=scale, name="sharegpt", **kw)


def ultrachat(num_conversations: int, seed: int = 0, scale: float = 1.0, **kw) -> list[Conversation]:
    """UltraChat-shaped conversations: 3.86 turns, 51.78 prompt and 257.81 answer tokens/turn."""
    return synthetic(num_conversations, **ULTRACHAT, seed=seed, scale=scale, name="ultrachat", **kw)


def multi_round_qa(num_users: int, rounds: int = 5, seed: int = 0, scale: float = 1.0,
                   system_len: int = 1000, question_len: float = 50, answer_len: int = 100,
                   question_sigma: float = 0.3) -> list[Conversation]:
    """Multi-round QA: every user shares one long system prompt (`system_len` tokens, the same
    ids for all: `system_key`), then asks `rounds` questions (log-normal, mean question_len)
    and each answer is exactly `answer_len` tokens. Lengths are multiplied by `scale`."""
    rng = np.random.default_rng(seed)
    sys_len = max(1, round(system_len * scale))
    out = []
    for u in range(num_users):
        q = lognormal_lengths(rng, question_len * scale, question_sigma, rounds)
        a = max(1, round(answer_len * scale))
        out.append(Conversation(f"mrqa-{seed}-{u}", tuple(Turn(int(x), a) for x in q), sys_len,
                                system_key=f"mrqa-{seed}"))
    return out


GENERATORS: dict[str, Callable[..., list[Conversation]]] = {
    "sharegpt": sharegpt, "ultrachat": ultrachat, "mrqa": multi_round_qa}


# -- timing ---------------------------------------------------------------------------------

def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of n events of a Poisson process with `rate` per second; the first
    arrives at 0. rate inf (or <= 0): all at 0."""
    if n == 0:
        return np.zeros(0)
    if not rate or rate <= 0 or math.isinf(rate):
        return np.zeros(n)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def think_times(turns: int, mean_s: float, rng: np.random.Generator) -> tuple[float, ...]:
    """Pauses before each turn: 0 before the first, then exponential with mean mean_s."""
    if turns == 0:
        return ()
    pauses = rng.exponential(mean_s, turns - 1) if mean_s > 0 else np.zeros(turns - 1)
    return (0.0,) + tuple(float(x) for x in pauses)


def schedule(conversations: Iterable[Conversation], rate: float = math.inf,
             think_time_s: float = 60.0, seed: int = 0, name: str | None = None) -> Workload:
    """Poisson conversation arrivals (rate per second) and exponential think times."""
    convs = tuple(conversations)
    rng = np.random.default_rng([seed, 7])
    arrivals = poisson_arrivals(len(convs), rate, rng)
    thinks = tuple(think_times(len(c.turns), think_time_s, rng) for c in convs)
    name = name or (convs[0].id.split("-")[0] if convs else "empty")
    return Workload(name, convs, tuple(float(a) for a in arrivals), thinks, float(rate),
                    float(think_time_s), seed)


# -- ShareGPT-format files ------------------------------------------------------------------

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
        turns = _cap_context(turns, sys_len, max_context)
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


# -- token ids for token-level replay ---------------------------------------------------------

def token_ids_for(conversation: Conversation, vocab_size: int, seed: int,
                  shared: dict[str, list[int]] | None = None, low: int = 0
                  ) -> tuple[list[int], list[list[int]]]:
    """Random ids (system prompt, [new user ids per turn]) with the drawn lengths. The same
    (conversation id, seed) gives the same ids; conversations sharing a system_key share the
    system prompt's ids through `shared`."""
    key = f"{seed}:{conversation.id}"
    rng = np.random.default_rng(list(key.encode()))
    system: list[int] = []
    if conversation.system_len:
        skey = f"{seed}:{conversation.system_key}" if conversation.system_key else None
        if skey is not None and shared is not None and skey in shared:
            system = shared[skey]
        else:
            srng = np.random.default_rng(list(skey.encode())) if skey else rng
            system = srng.integers(low, vocab_size, conversation.system_len).tolist()
            if skey is not None and shared is not None:
                shared[skey] = system
    turns = [rng.integers(low, vocab_size, t.prompt_len).tolist() for t in conversation.turns]
    return system, turns
