"""One pass of a workload against a target: every conversation a closed-loop user."""

from __future__ import annotations

import threading
import time
from typing import Any

import workload as wl
from common import progress_bar

from .turns import TurnRecord


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
    bar = progress_bar(workload.num_turns, progress, desc=desc, unit="turn", leave=False)
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
