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

Parts: workload_conversations.py (Turn, Conversation, summarize) and workload_sharegpt.py (the
file format); this module re-exports them, so `import workload as wl` gives the whole API.
This module needs only numpy (no jax), so a peer process without jax can import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import numpy as np

from workload_conversations import Conversation, Turn, cap_context, summarize
from workload_sharegpt import (ASSISTANT_ROLES, USER_ROLES, load_sharegpt,
                               parse_sharegpt_record, write_sharegpt)

__all__ = ["ANSWER_SIGMA", "ASSISTANT_ROLES", "Conversation", "GENERATORS", "PROMPT_SIGMA",
           "SHAREGPT", "Turn", "ULTRACHAT", "USER_ROLES", "Workload", "cap_context",
           "load_sharegpt", "lognormal_lengths", "multi_round_qa", "parse_sharegpt_record",
           "poisson_arrivals", "schedule", "sharegpt", "summarize", "synthetic", "think_times",
           "token_ids_for", "turn_counts", "ultrachat", "write_sharegpt"]

SHAREGPT = {"turns": 5.56, "prompt": 37.77, "answer": 204.58}
ULTRACHAT = {"turns": 3.86, "prompt": 51.78, "answer": 257.81}
PROMPT_SIGMA = 0.8      # log-normal shape of user prompts (heavy-tailed)
ANSWER_SIGMA = 0.6      # ... and of answers


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
        ts = cap_context([Turn(int(x), int(y)) for x, y in zip(p, a)], system_len, max_context)
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
