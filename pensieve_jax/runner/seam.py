"""The device seam: what the engine and the KV cache layer ask of a runner.

ModelRunner (runner/model_runner.py) is the one that runs the model on a device; a runner
without a device (tests/fake_runner.py) implements the same protocol, so the real engine,
scheduler and KV cache are tested over it.

    programs        ProgramSet: the step shapes (token ladder, layered loads)
    dtype           the pools' dtype
    params, kv      the weights and pools as the programs take them (the engine frees them)
    ready           every program compiled (precompile ran)
    in_step_load_error   why steps cannot load host pages inside (None: they can)
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from pensieve_jax.runner.programs import ProgramSet, StepShape
from pensieve_jax.runner.step_program import HostPages, StepHandle, StepInput


class Runner(Protocol):
    programs: ProgramSet
    dtype: Any
    params: Any
    kv: Any

    @property
    def ready(self) -> bool: ...

    @property
    def in_step_load_error(self) -> str | None: ...

    def precompile(self, progress: Callable[[StepShape, float], None] | None = None) -> None:
        """Compile every program; the runner is ready afterwards."""

    def dispatch(self, s: StepInput, incoming: HostPages | None = None,
                 last: StepHandle | None = None, token_src: np.ndarray | None = None
                 ) -> StepHandle:
        """Start a step (rows reading `last`'s samples where token_src >= 0)."""

    def fetch(self, handle: StepHandle) -> np.ndarray:
        """A dispatched step's sampled tokens, int32 [S] (waits for it)."""

    def step(self, s: StepInput, incoming: HostPages | None = None) -> np.ndarray:
        """dispatch, then fetch."""

    def reset_kv(self) -> None:
        """Fresh pools (a failed step donated the old ones)."""

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None: ...

    def gather_pages(self, page_ids: list[int]) -> list[tuple[Any, Any]]: ...

    def gather_pages_host(self, page_ids: list[int]) -> tuple[np.ndarray, np.ndarray]: ...

    def scatter_pages(self, k: np.ndarray, v: np.ndarray, page_ids: list[int]) -> None: ...

    def stage_pages(self, k: np.ndarray, v: np.ndarray) -> list[tuple[Any, Any]]: ...

    def scatter_staged(self, staged: list[tuple[Any, Any]], page_ids: list[int]) -> None: ...

    def report_stats(self) -> dict[str, dict[str, Any]]:
        """A Reporter (model/reporting.py): programs, the step program set (count, shapes,
        page_chunk), compiles (compiled, compile_s, ready, step_programs_after_ready) and
        padding (real_tokens, padded_tokens)."""
