"""pensieve_jax/model/self_check.py: which attention an engine runs (by platform), the start-up
self-check of the Pallas kernel against the XLA path, and the fallback to XLA on a mismatch
(forced here on CPU with a wrong or raising kernel and a device that says it is a GPU)."""

import logging
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from pensieve_jax.model import self_check
from pensieve_jax.model.config import PRESETS
from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.model.self_check import (SelfCheckResult, attention_self_check, resolve_attention,
                                     select_attention)
from pensieve_jax.weights import load_model

TINY = PRESETS["tiny"]
FAKE_GPU = SimpleNamespace(platform="gpu", device_kind="fake GPU")


def result(ok: bool, err: float | None = 0.0, error: str | None = None) -> SelfCheckResult:
    return SelfCheckResult(ok=ok, platform="gpu", device="fake GPU", dtype="float32",
                           interpret=False, max_abs_err=err, tolerance=1e-4, seconds=0.0,
                           error=error)


def test_resolve_attention_by_platform():
    assert resolve_attention(None, "gpu") == "pallas"
    assert resolve_attention(None, "cpu") == "xla"
    assert resolve_attention(None, "tpu") == "xla"
    assert resolve_attention("xla", "gpu") == "xla"
    assert resolve_attention("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_attention("nope", "gpu")
    with pytest.raises(ValueError, match="attention must be one of"):
        EngineConfig(attention="nope")
    assert EngineConfig().attention is None


def test_select_attention_checks_only_the_kernel_on_a_gpu():
    calls = []

    def check(*args, **kw):
        calls.append(args)
        return result(True)
    cpu = SimpleNamespace(platform="cpu", device_kind="cpu")
    assert select_attention(None, TINY, 16, "float32", device=cpu, check=check).attention == "xla"
    assert select_attention("pallas", TINY, 16, "float32", device=cpu,
                            check=check).self_check is None      # interpreted: nothing to check
    assert select_attention("xla", TINY, 16, "float32", device=FAKE_GPU,
                            check=check).attention == "xla"
    assert not calls
    choice = select_attention(None, TINY, 16, "bfloat16", tensor_parallel=2, device=FAKE_GPU,
                              check=check)
    assert (choice.attention, choice.fallback, choice.self_check.ok) == ("pallas", False, True)
    # the kernel is checked with the per-device head layout, page size and dtype
    assert calls == [(TINY.num_heads // 2, TINY.num_kv_heads // 2, TINY.head_dim, 16,
                      "bfloat16")]


def test_select_attention_falls_back_loudly(caplog):
    with caplog.at_level(logging.ERROR, logger="pensieve_jax.model.self_check"):
        choice = select_attention(None, TINY, 16, "float32", device=FAKE_GPU,
                                  check=lambda *a, **k: result(False, err=0.5))
    assert (choice.requested, choice.attention, choice.fallback) == (None, "xla", True)
    assert choice.as_dict()["self_check"]["max_abs_err"] == 0.5
    assert "ATTENTION SELF-CHECK FAILED" in caplog.text and "0.5" in caplog.text


def test_self_check_of_the_interpreted_kernel_passes():
    r = attention_self_check(4, 2, 16, 4, "float32")
    assert r.ok and r.interpret and r.platform == "cpu" and r.error is None
    assert r.max_abs_err <= r.tolerance == self_check.TOLERANCE["float32"]


def test_a_windowed_model_checks_the_windowed_kernel():
    """select_attention hands the model's window (shortened so the check's contexts cross
    it) to the check, and the windowed kernel passes it; a kernel ignoring it would not."""
    import dataclasses
    seen = []

    def check(*args, **kw):
        seen.append(kw.get("sliding_window"))
        return result(True)
    for window, want in ((4096, 24), (10, 10), (None, None)):
        select_attention(None, dataclasses.replace(TINY, sliding_window=window), 16,
                         "float32", device=FAKE_GPU, check=check)
        assert seen.pop() == want
    assert attention_self_check(4, 2, 16, 4, "float32", sliding_window=10).ok
    unwindowed = attention_self_check(
        4, 2, 16, 4, "float32", sliding_window=10,
        candidate=lambda p, interpret: self_check.kernel_attention(
            p._replace(sliding_window=None), interpret))
    assert not unwindowed.ok and unwindowed.error is None


def test_self_check_catches_a_wrong_or_raising_kernel():
    wrong = attention_self_check(4, 2, 16, 4, "bfloat16",
                                 candidate=lambda p, interpret: jnp.zeros_like(p.q))
    assert not wrong.ok and wrong.error is None and wrong.max_abs_err > wrong.tolerance

    def broken(p, interpret):
        raise RuntimeError("Triton lowering failed")
    failed = attention_self_check(4, 2, 16, 4, "float32", candidate=broken)
    assert not failed.ok and failed.max_abs_err is None
    assert failed.error == "RuntimeError: Triton lowering failed"


@pytest.mark.parametrize("kernel_ok", [False, True])
def test_engine_on_a_gpu_falls_back_to_xla_and_stats_say_so(monkeypatch, kernel_ok):
    # the engine's device claims to be a GPU; the kernel is replaced by a wrong (or a right) one
    monkeypatch.setattr(self_check, "device_platform", lambda device=None: "gpu")
    monkeypatch.setattr(self_check, "kernel_attention",
                        (lambda p, interpret: self_check.xla_attention(p)) if kernel_ok else
                        (lambda p, interpret: self_check.xla_attention(p) + 1.0))
    model = load_model("random:tiny", "float32")
    config = EngineConfig(max_model_len=64, max_batched_tokens=16, max_num_seqs=2,
                          num_pages=8, precompile=False)
    with Engine(model, "float32", config) as engine:
        stats = engine.stats()
    assert stats["attention"] == ("pallas" if kernel_ok else "xla")
    check = stats["attention_check"]
    assert check["requested"] is None and check["platform"] == "gpu"
    assert check["fallback"] is not kernel_ok
    assert check["self_check"]["ok"] is kernel_ok
    assert check["self_check"]["max_abs_err"] == pytest.approx(0.0 if kernel_ok else 1.0)
