"""What a phase of benchmarks/gpu_check.py writes: its JSON (atomically, so a kill mid-write
leaves the previous file), the Phase record a phase function gets, and errors as short text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any


def plain(o: Any) -> Any:
    """json default: NumPy scalars as numbers, anything else as its str."""
    item = getattr(o, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(o)


def save_json(path: Path, obj: dict) -> None:
    """Write atomically (a kill mid-write leaves the previous file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=plain) + "\n")
    os.replace(tmp, path)


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def error_text(e: BaseException) -> str:
    """'Type: message' and the innermost frames, short enough for a results file."""
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return (f"{type(e).__name__}: {e}"[:1500] + "\n" + "".join(tb[-3:])[-1500:]).strip()


# -- what a phase function gets ----------------------------------------------------------------

@dataclasses.dataclass
class Phase:
    """What a phase function gets: where to write, the deadline and the mode; `result` is its
    JSON, saved (incomplete) at each save() and completed by run_phase."""

    name: str
    out: Path
    dry_run: bool
    deadline: float              # time.time() by which the phase must have finished
    budget_s: float
    interpret: bool = True
    result: dict = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time()

    def has_time(self, need_s: float, what: str) -> bool:
        """Whether need_s seconds are left; if not, record `what` as skipped."""
        if self.left() >= need_s:
            return True
        self.result.setdefault("skipped", []).append(
            f"{what}: {self.left():.0f} s left of the budget, about {need_s:.0f} s needed")
        self.save()
        return False

    def save(self) -> None:
        save_json(self.out / f"{self.name}.json", self.result)
