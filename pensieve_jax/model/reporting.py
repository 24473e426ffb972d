"""Statistics reported through one interface: every part of an engine that counts something is
a `Reporter`, and `Engine.stats()` is the merge of their reports plus a few entries derived
from them (engine/stats.py).

    part (module)                        reports
    Turns (engine/turns.py)              the turn and token counters (top level)
    Scheduler (engine/scheduler.py)      running, waiting, preemptions
    StepLoop (engine/loop.py)            loop: where its time goes, overlap
    ConversationStore (kvcache/...)      conversations, page counters, resident tokens,
                                         sharing, eviction_policy
    Swapper (kvcache/swap.py)            swap (host copies, transfer rates), disk
    PageAllocator (kvcache/pages.py)     pages: {its tier: used, free, total}
    HostCache (kvcache/host_cache.py)    pages: {"host": ...} (zeros without a host tier)
    the runner (runner/seam.py)          programs: the step program set, compiles, padding
    WarmUp (engine/warm_up.py)           programs: warm_up_s
    CompileWatch (runner/compile_watch)  programs: compilations_after_ready,
                                         compiled_after_ready
    AttentionChoice (model/self_check)   attention, attention_check
    the engine (engine/stats.py)         its configuration (cache_policy, page_size,
                                         max_model_len) and the entries derived from the rest

A report is a mapping of this part's own entries of the stats, keyed as they appear there; a
nested mapping (pages, programs, sharing) may be filled by several parts, key by key, but no
entry (a leaf) by two: `merge_reports` raises. The protocol lives in the lowest layer that has
a part reporting (the model's attention choice), so every layer above can name it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, runtime_checkable


@runtime_checkable
class Reporter(Protocol):
    def report_stats(self) -> Mapping[str, Any]:
        """This part's own entries of Engine.stats(), as plain values (a fresh mapping: the
        caller may keep it); documented where the part counts them."""


def merge_reports(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One dict of every report's entries (nested mappings merged key by key and copied).
    Raises ValueError naming the entry if two reports give the same one."""
    out: dict[str, Any] = {}
    for report in reports:
        _merge_into(out, report, "")
    return out


def _merge_into(out: dict[str, Any], report: Mapping[str, Any], prefix: str) -> None:
    for key, value in report.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            inner = out.setdefault(key, {})
            if not isinstance(inner, dict):
                raise ValueError(f"stats entry {path!r} is reported by two parts")
            _merge_into(inner, value, path + ".")
        elif key in out:
            raise ValueError(f"stats entry {path!r} is reported by two parts")
        else:
            out[key] = value


__all__ = ["Reporter", "merge_reports"]
