"""The OpenAI HTTP gateway (serving/http) against plain gRPC on the same server, and stateful
against stateless conversations through HTTP, on a multi-turn ShareGPT-shaped replay.

    python benchmarks/bench_http.py --model random:tiny --out benchmarks/results/bench_http_cpu.json

One `python -m serving serve --http-port 0` process (the gateway on the gRPC server's event
loop, as deployed) and the clients in this process; the same conversations (benchmarks/workload.py `sharegpt`, closed-loop users, `--concurrency` at a
time) replayed four ways, every reply streamed, greedy, of the drawn answer length:

    | mode           | API                                           | server path             |
    |----------------|-----------------------------------------------|-------------------------|
    | grpc_stateful  | serving.client RemoteSession (gRPC Chat)      | Chat, kept conversation |
    | http_stateful  | openai responses.create(previous_response_id) | the same, via gateway   |
    | grpc_stateless | gRPC Generate(messages), history resent       | Generate, prefix reuse  |
    | http_stateless | openai chat.completions, history resent       | the same, via gateway   |

HTTP vs gRPC (same server path): overhead per completion token = (HTTP wall - gRPC wall) /
completion tokens, and the ratio of wall times. Stateful vs stateless through HTTP: prompt
tokens computed (prefilled + recomputed), cached tokens, time to first token. Each mode's text
is tagged so no mode hits another's cache; a warm-up pass (discarded) compiles the step shapes;
`--rounds` repeats the four modes in turn; each comparison is the median over the rounds.

With random:<preset> models the stateless modes resend more prompt tokens than the stateful ones
hold: a random model's reply is mostly reserved tokens, whose text ("<|reserved_312|>") encodes
back to ~9x as many byte tokens, so the resent history grows faster than the kept one (real
models' text encodes back to about its own tokens). Hence the small default --scale and
--max-context: the stateless histories stay under max_model_len.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import random
import re
import signal
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import workload as wl  # noqa: E402
from common import environment, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("grpc_stateful", "http_stateful", "grpc_stateless", "http_stateless")
NAME = "bench"


def user_text(rng: random.Random, n: int) -> str:
    """n characters of lowercase words (random:<preset> tokenizers: one token per byte)."""
    return rng.choice(string.ascii_lowercase) + \
        "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n - 1))


def timed(call: Callable[[], Iterable[tuple[str, Any]]]) -> tuple[float, float, str, Any]:
    """Make the call (timed from here: an HTTP stream returns once its first event arrived)
    and consume its (text, final-or-None) pairs: (wall_s, client ttft_s, text, last final)."""
    start, ttft, text, final = time.perf_counter(), None, [], None
    for piece, last in call():
        if piece:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            text.append(piece)
        final = last if last is not None else final
    return time.perf_counter() - start, ttft or 0.0, "".join(text), final


def record(wall, ttft, tokens, prompt, cached, computed, engine_ttft) -> dict[str, float]:
    return {"wall_s": wall, "ttft_s": ttft, "tokens": tokens, "prompt": prompt,
            "cached": cached, "computed": computed, "engine_ttft_s": engine_ttft}


def from_http(wall, ttft, usage, prompt_key, details_key) -> dict[str, float]:
    """A record from an OpenAI usage object (its `pensieve` extra: computed, engine TTFT)."""
    u = usage.model_dump()
    extra = u.get("pensieve") or {}
    return record(wall, ttft, u["completion_tokens" if "completion_tokens" in u else
                                "output_tokens"], u[prompt_key], u[details_key]["cached_tokens"],
                  extra["prefilled_tokens"] + extra["recomputed_tokens"], extra["ttft_s"])


class Replayer:
    """Runs one conversation's turns through one of the four modes."""

    def __init__(self, grpc_target: str, http_url: str, ignore_eos: bool):
        import openai

        from serving.client import connect
        self.client = connect(grpc_target)
        self.http = openai.OpenAI(base_url=http_url, api_key="bench", max_retries=0,
                                  timeout=600)
        self.ignore_eos = ignore_eos

    def params(self, n: int):
        from pensieve_jax.engine.sampling import SamplingParams
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=self.ignore_eos)

    def grpc_stateful(self, texts: list[str], answers: list[int]) -> list[dict]:
        session, out = self.client.session(), []
        for text, n in zip(texts, answers):
            wall, ttft, _, _ = timed(lambda: ((c.text, None) for c in
                                             session.stream_chunks(text, self.params(n))))
            u = session.last_reply.usage
            out.append(record(wall, ttft, u.completion_tokens, u.prompt_tokens, u.cached_tokens,
                              u.prefilled_tokens + u.recomputed_tokens, u.ttft_s))
        session.close()
        return out

    def grpc_stateless(self, texts: list[str], answers: list[int]) -> list[dict]:
        from serving.pensieve.v1 import pensieve_pb2 as pb
        from serving.protocol import sampling_to_proto
        history, out = [], []
        for text, n in zip(texts, answers):
            history.append(pb.Message(role="user", content=text))
            request = pb.GenerateRequest(messages=pb.Messages(messages=history),
                                         sampling=sampling_to_proto(self.params(n)))
            wall, ttft, reply, last = timed(lambda: (
                (r.text, r if r.finish_reason else None)
                for r in self.client.stub.Generate(request)))
            u = last.usage
            out.append(record(wall, ttft, u.completion_tokens, u.prompt_tokens, u.cached_tokens,
                              u.prefilled_tokens + u.recomputed_tokens, u.ttft_s))
            history.append(pb.Message(role="assistant", content=reply))
        return out

    def http_stateful(self, texts: list[str], answers: list[int]) -> list[dict]:
        previous, out = None, []
        for text, n in zip(texts, answers):
            def call():
                events = self.http.responses.create(
                    model=NAME, input=text, previous_response_id=previous,
                    max_output_tokens=n, temperature=0, stream=True,
                    extra_body={"ignore_eos": self.ignore_eos})
                return ((e.delta if e.type == "response.output_text.delta" else "",
                         e.response if e.type in ("response.completed", "response.incomplete")
                         else None) for e in events)
            wall, ttft, _, final = timed(call)
            previous = final.id
            out.append(from_http(wall, ttft, final.usage, "input_tokens",
                                 "input_tokens_details"))
        self.http.responses.delete(previous)
        return out

    def http_stateless(self, texts: list[str], answers: list[int]) -> list[dict]:
        history, out = [], []
        for text, n in zip(texts, answers):
            history.append({"role": "user", "content": text})
            def call():
                chunks = self.http.chat.completions.create(
                    model=NAME, messages=history, max_tokens=n, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": self.ignore_eos})
                return (((c.choices[0].delta.content or "") if c.choices else "", c.usage)
                        for c in chunks)
            wall, ttft, reply, usage = timed(call)
            out.append(from_http(wall, ttft, usage, "prompt_tokens", "prompt_tokens_details"))
            history.append({"role": "assistant", "content": reply})
        return out


def replay(replayer: Replayer, mode: str, conversations, tag: str, seed: int,
           concurrency: int) -> dict[str, Any]:
    """All conversations through one mode (`concurrency` users at a time): summed records."""
    def one(i_conv):
        i, conv = i_conv
        rng = random.Random(f"{seed}-{i}")
        texts = [user_text(rng, t.prompt_len) for t in conv.turns]
        texts[0] = f"[{tag} {i}] {texts[0]}"            # no mode hits another mode's cache
        return getattr(replayer, mode)(texts, [t.answer_len for t in conv.turns])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        turns = [t for ts in pool.map(one, enumerate(conversations)) for t in ts]
    keys = ("wall_s", "ttft_s", "tokens", "prompt", "cached", "computed", "engine_ttft_s")
    out = {k: sum(t[k] for t in turns) for k in keys}
    out.update(turns=len(turns), elapsed_s=time.perf_counter() - start)
    return out


def compare(modes: dict[str, dict]) -> dict[str, Any]:
    """One round's comparisons (modes: that round's sums per mode)."""
    out: dict[str, Any] = {}
    for kind in ("stateful", "stateless"):
        g, h = modes[f"grpc_{kind}"], modes[f"http_{kind}"]
        out[f"http_vs_grpc_{kind}"] = {
            "overhead_ms_per_token": 1e3 * (h["wall_s"] - g["wall_s"]) / h["tokens"],
            "wall_ratio": h["wall_s"] / g["wall_s"],
            "ttft_overhead_ms": (h["ttft_s"] - g["ttft_s"]) * 1e3 / h["turns"]}
    s, n = modes["http_stateful"], modes["http_stateless"]
    out["stateful_vs_stateless_http"] = {
        k: {"stateful": s[k], "stateless": n[k]} for k in ("prompt", "cached", "computed")}
    for key, name in (("ttft_s", "mean_ttft_ms"), ("engine_ttft_s", "mean_engine_ttft_ms")):
        out["stateful_vs_stateless_http"][name] = {
            "stateful": 1e3 * s[key] / s["turns"], "stateless": 1e3 * n[key] / n["turns"]}
    return out


def median_of(rounds: list[dict]) -> dict:
    """The per-round comparisons' medians, leaf by leaf (a compile or a load spike in one
    round does not move them)."""
    first = rounds[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in rounds]) for k in first}
    return statistics.median(rounds)


@contextlib.contextmanager
def served(model: str, engine_flags: list[str]):
    """`python -m serving serve ... --http-port 0` (gateway and server in one process, as
    deployed): yields (gRPC target, HTTP base URL)."""
    command = [sys.executable, "-m", "serving", "serve", "--model", model, "--port", "0",
               "--http-port", "0", "--served-model-name", NAME, *engine_flags]
    env = {**os.environ, "PENSIEVE_JAX_PRECOMPILE": "0"}     # the warm-up pass compiles
    proc = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    target = url = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"serving \S+ on (\S+:\d+)", line):
            target = m.group(1)
        if m := re.search(r"OpenAI API on (\S+/v1)", line):
            url = m.group(1)
        if target and url:
            break
    try:
        if not (target and url):
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        yield target, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--scale", type=float, default=0.1, help="ShareGPT length scale")
    p.add_argument("--max-context", type=int, default=192)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="--max-model-len=2048 --page-size=64 --num-pages=512",
                   help="engine flags of the served process")
    p.add_argument("--out", default="benchmarks/results/bench_http_cpu.json")
    args = p.parse_args(argv)

    conversations = wl.sharegpt(args.conversations, seed=args.seed, scale=args.scale,
                                max_context=args.max_context)
    ignore_eos = args.model.startswith("random:")
    rounds: list[dict[str, dict]] = []
    with served(args.model, args.engine.split()) as (target, url):
        replayer = Replayer(target, url, ignore_eos)
        for mode in MODES:                                   # warm-up: compiles, discarded
            replay(replayer, mode, conversations[:len(conversations) // 2], f"warm-{mode}",
                   args.seed, args.concurrency)
        for r in range(args.rounds):
            rounds.append({})
            for mode in MODES:
                got = replay(replayer, mode, conversations, f"{mode}-{r}", args.seed,
                             args.concurrency)
                rounds[-1][mode] = got
                print(f"round {r} {mode:15s} {got['tokens']:6d} tokens {got['wall_s']:7.2f} s "
                      f"turn wall  ttft {1e3 * got['ttft_s'] / got['turns']:6.1f} ms  cached "
                      f"{got['cached']:6d}  computed {got['computed']:6d}", flush=True)
    result = {"environment": environment(argv, __file__), "config": vars(args),
              "note": __doc__.split("\n\n")[-1].strip(),
              "workload": wl.summarize(conversations), "rounds": rounds,
              "comparison": median_of([compare(modes) for modes in rounds])}
    for name, value in result["comparison"].items():
        print(name, value)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
