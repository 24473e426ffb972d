"""The engine's life cycle at both ends: a script that leaves an engine open exits 0 (the engine
thread is stopped at interpreter exit, before it could be caught inside a JAX call while the
interpreter finalizes: exit 134 before), `with Engine... as e:` closes it, close() is
idempotent and the engine takes no work after it.

Each case runs a short script in its own interpreter: what is checked is how that one ends."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = 'Engine.from_pretrained("random:tiny", max_model_len=128, page_size=8, num_pages=32, ' \
       'max_num_seqs=4, max_batched_tokens=64)'

# Registered after JAX's exit hooks and before the engine module's (atexit runs them last in,
# first out): it runs once the engines were closed at exit, before JAX clears its backends.
PRELUDE = """
import atexit, threading
import jax

CHECKS = []

@atexit.register
def report():
    for name, check in CHECKS:
        print(f"check {name}: {check()}", flush=True)

def engine_threads():
    return [t.name for t in threading.enumerate() if t.name == "pensieve-engine"]

def all_deleted(tree):
    return all(a.is_deleted() for a in jax.tree_util.tree_leaves(tree))

from pensieve_jax.engine.engine import Engine, EngineClosed
from pensieve_jax.engine.sampling import SamplingParams
"""


def run_script(body: str, timeout: float = 300) -> str:
    script = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    return proc.stdout


def checks(stdout: str) -> dict[str, str]:
    return dict(line[len("check "):].split(": ", 1) for line in stdout.splitlines()
                if line.startswith("check "))


@pytest.mark.slow   # 28 s (the real model): .ci/run runs it after `make test`
def test_a_script_that_leaves_the_default_model_open_exits_cleanly():
    """The bug case: generate 8 tokens with the embedded SmolLM2 and return (the turn's cache
    flush step was often still running on the engine thread as the script ended). A second
    turn left running makes that certain: before, this exited 134 every time."""
    out = run_script("""
        engine = Engine.from_pretrained("smollm2-135m-instruct")
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
        print("generated", len(engine.generate(ids, SamplingParams(max_tokens=8,
                                                                  ignore_eos=True))))
        next(iter(engine.submit(ids, SamplingParams(max_tokens=200, ignore_eos=True))))
        kv, params = engine.runner.kv, engine.model.params
        CHECKS.append(("threads", engine_threads))
        CHECKS.append(("closed", lambda: engine.closed))
        CHECKS.append(("kv deleted", lambda: all_deleted(kv)))
        CHECKS.append(("params deleted", lambda: all_deleted(params)))
    """)
    assert "generated 8" in out
    assert checks(out) == {"threads": "[]", "closed": "True", "kv deleted": "True",
                           "params deleted": "True"}


@pytest.mark.slow
def test_with_closes_the_engine():
    out = run_script(f"""
        with {TINY} as e:
            assert e.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
            kv, params = e.runner.kv, e.model.params
            assert engine_threads() == ["pensieve-engine"]
        print("after with:", engine_threads(), e.closed, all_deleted(kv), all_deleted(params))
    """)
    assert "after with: [] True True True" in out


@pytest.mark.slow
def test_close_is_idempotent_and_the_engine_takes_no_work_after_it():
    out = run_script(f"""
        import pytest
        e = {TINY}
        # an engine on the same weights keeps them alive when the one that loaded them closes
        other = Engine(e.model, "float32", e.config)
        session = e.session()
        session.send("Hi", SamplingParams(max_tokens=2))
        running = e.submit([1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
        next(iter(running))                    # the turn is running
        entered, release = threading.Event(), threading.Event()
        def hold():                            # the engine waits here, between two steps
            entered.set()
            release.wait()
        threading.Thread(target=e.call, args=(hold,), daemon=True).start()
        entered.wait()
        threading.Timer(0.2, release.set).start()
        e.close()                              # ends the turn, after `hold`
        e.close()
        e.shutdown()                           # the earlier name: the same
        with pytest.raises(EngineClosed):      # the running turn ended with the engine
            running.result()
        running.cancel()                       # nothing to stop: no error
        session.close()                        # its cache went with the engine: no error
        for call in (lambda: e.submit([1, 2]), lambda: e.generate([1, 2]), e.stats,
                     lambda: e.end_conversation("x"), lambda: e.call(lambda: 1)):
            with pytest.raises(RuntimeError, match="closed"):
                call()
        assert issubclass(EngineClosed, RuntimeError)
        print("closed:", engine_threads(), e.closed, all_deleted(e.model.params))
        assert other.generate([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
        params = other.model.params
        with other:
            pass
        print("other closed:", all_deleted(params))
    """)
    assert "closed: [] True False" in out          # `other` still uses the weights
    assert "other closed: False" in out            # not its own: left to the garbage collector


@pytest.mark.slow
def test_the_demo_entry_point_exits_0():
    """`python -m pensieve_jax.demo` (what `make demo` runs) on a random model, to the end."""
    proc = subprocess.run([sys.executable, "-m", "pensieve_jax.demo", "--model", "random:tiny",
                           "--max-tokens", "3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stats:" in proc.stdout
