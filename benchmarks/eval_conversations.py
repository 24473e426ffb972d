"""Batch evaluation: run every conversation of a JSONL file through the engine and write each
assistant reply with its usage. Resumable: conversations already in the output are skipped.

    python benchmarks/eval_conversations.py conversations.jsonl replies.jsonl \
        --model smollm2-135m-instruct --max-tokens 256 --concurrency 16

Input, one conversation per line (any of these shapes):

    {"id": "c1", "system": "You are terse.", "turns": ["Hi!", "And then?"]}
    {"id": "c2", "messages": [{"role": "system", "content": ...}, {"role": "user", ...}, ...]}
    {"id": "c3", "conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}

Only the user turns are sent (in order, each after the model's reply to the one before);
assistant messages in the input are ignored. A line without an "id" gets "line-<n>" (its
1-based line number). A line may carry its own "max_tokens".

Output, one line per conversation, in completion order, appended and flushed as soon as the
conversation finishes:

    {"id": "c1", "turns": [{"user": "Hi!", "assistant": "...", "finish_reason": "stop",
      "usage": {"prompt_tokens": ..., "cached_tokens": ..., ...}}, ...],
     "seconds": 1.2, "model": "..."}

Rerunning with the same output file skips every id already written (a line cut short by a kill
is dropped and redone). A conversation whose input the engine rejects (say, longer than
--max-model-len) is written with an "error" and not retried; any other failure is reported,
left out of the output, and retried by the next run (the exit status is then 1).

Conversations run concurrently (--concurrency threads, each an `engine.session()`), so the
engine batches their turns together.
"""

from __future__ import annotations

import argparse
import dataclasses
import queue
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

from common import progress_bar
from eval_records import (EvalConversation, ReplyWriter, completed_ids, parse_conversation,
                          read_conversations)

__all__ = ["EvalConversation", "completed_ids", "conversation_seed", "main", "make_parser",
           "parse_conversation", "read_conversations", "run", "run_conversation"]


def conversation_seed(base: int | None, cid: str) -> int | None:
    """A per-conversation sampling seed: the same conversation samples the same way on a rerun,
    whatever order the conversations run in."""
    if base is None:
        return None
    return (zlib.crc32(cid.encode()) ^ (base * 0x9E3779B1)) & 0xFFFFFFFF


def run_conversation(engine, conv: EvalConversation, params) -> dict[str, Any]:
    """The conversation's replies. If the engine rejects a turn (ValueError: say the history
    outgrew max_model_len) the record keeps the turns before it and gets an "error"."""
    start = time.perf_counter()
    turns = []
    record: dict[str, Any] = {"id": conv.id}
    if conv.max_tokens is not None:
        params = dataclasses.replace(params, max_tokens=conv.max_tokens)
    base_seed = conversation_seed(params.seed, conv.id)
    with engine.session(system=conv.system) as session:
        for k, text in enumerate(conv.turns):
            turn_params = params if base_seed is None else \
                dataclasses.replace(params, seed=(base_seed + k) & 0xFFFFFFFF)
            try:
                reply = session.send(text, turn_params)
            except ValueError as e:
                record["error"] = f"turn {k}: {type(e).__name__}: {e}"
                break
            turns.append({"user": text, "assistant": reply.text,
                          "finish_reason": reply.finish_reason,
                          "usage": dataclasses.asdict(reply.usage)})
    record.update(turns=turns, seconds=time.perf_counter() - start)
    return record


def run(engine, conversations: Sequence[EvalConversation], out_path: str | Path, params, *,
        concurrency: int = 8, progress: bool = False, fsync: bool = False,
        stop_after: int | None = None, model_name: str | None = None) -> dict[str, Any]:
    """Run the conversations not yet in out_path; returns counts. stop_after: stop starting
    new conversations once this many were written in this call (an interruption, for tests)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = completed_ids(out_path)
    todo = [c for c in conversations if c.id not in done]
    work: queue.Queue = queue.Queue()
    for c in todo:
        work.put(c)
    writer = ReplyWriter(out_path, fsync, {"model": model_name} if model_name else {})
    counts = {"skipped": len(conversations) - len(todo), "written": 0, "rejected": 0,
              "failed": 0}
    failures: list[tuple[str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    bar = progress_bar(len(todo), progress, unit="conv")

    def worker() -> None:
        while not stop.is_set():
            try:
                conv = work.get_nowait()
            except queue.Empty:
                return
            try:
                record = run_conversation(engine, conv, params)
                key = "rejected" if "error" in record else "written"
            except Exception as e:  # noqa: BLE001  transient: not written, retried next run
                with lock:
                    counts["failed"] += 1
                    failures.append((conv.id, f"{type(e).__name__}: {e}"))
                continue
            writer.write(record)
            with lock:
                counts[key] += 1
                bar.update(1)
                if stop_after is not None and counts["written"] + counts["rejected"] >= stop_after:
                    stop.set()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(max(1, min(concurrency, len(todo))))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        writer.close()
        bar.close()
    counts["seconds"] = time.perf_counter() - start
    counts["remaining"] = work.qsize()
    counts["failures"] = failures
    return counts


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("input", help="JSONL of conversations")
    ap.add_argument("output", help="JSONL of replies (appended; existing ids are skipped)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, help="base sampling seed (per conversation and turn)")
    ap.add_argument("--concurrency", type=int, default=8, help="conversations at once")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--limit", type=int, help="only the first N conversations of the input")
    ap.add_argument("--fsync", action="store_true", help="fsync after every conversation")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None, engine=None) -> int:
    """Exit status: 0 when every conversation is in the output, 1 if some failed."""
    args = make_parser().parse_args(argv)
    conversations = read_conversations(args.input)
    if args.limit is not None:
        conversations = conversations[:args.limit]
    from pensieve_jax.engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    own = engine is None
    if own:
        if not (set(str(c.id) for c in conversations) - completed_ids(args.output)):
            print(f"all {len(conversations)} conversations are already in {args.output}")
            return 0
        from pensieve_jax.engine.engine import Engine
        options = {"max_num_seqs": max(1, args.concurrency),
                   "max_batched_tokens": args.max_batched_tokens}
        if args.max_model_len:
            options["max_model_len"] = args.max_model_len
        engine = Engine.from_pretrained(args.model, args.dtype, **options)
    try:
        counts = run(engine, conversations, args.output, params, concurrency=args.concurrency,
                     progress=not args.no_progress, fsync=args.fsync,
                     model_name=getattr(engine.model, "source", args.model))
    finally:
        if own:
            engine.shutdown()
    print(f"{counts['written']} written, {counts['rejected']} rejected, {counts['skipped']} "
          f"already done, {counts['failed']} failed in {counts['seconds']:.1f} s -> "
          f"{args.output}")
    for cid, err in counts["failures"]:
        print(f"failed: {cid}: {err}", file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
