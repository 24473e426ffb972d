import gc
import os

# Engines built by tests compile their step programs on first use (each test meets only a few);
# tests of the warm-up itself ask for it with EngineConfig(precompile=True).
os.environ.setdefault("PENSIEVE_JAX_PRECOMPILE", "0")
# Hermetic: the compilation cache and converted models live in a directory of this session
# (shared with the servers and scripts tests start), never the user's; traced step programs
# (pensieve_jax/runner/program_store.py) are kept there too, as a user's are.
if "PENSIEVE_JAX_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix="pensieve-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["PENSIEVE_JAX_CACHE"] = _cache

import jax  # noqa: E402
import numpy as np
import pytest

from pensieve_jax.model.attention import AttentionBatch, init_kv_cache


def dense_attention(q, k, v, q_pos, sm_scale):
    """Plain causal attention for one sequence. q [n, H, D], k/v [C, KVH, D], q_pos [n]."""
    h, kvh = q.shape[1], k.shape[1]
    k = np.repeat(k, h // kvh, axis=1)
    v = np.repeat(v, h // kvh, axis=1)
    s = np.einsum("qhd,chd->hqc", q.astype(np.float64), k.astype(np.float64)) * sm_scale
    mask = np.arange(k.shape[0])[None, :] <= np.asarray(q_pos)[:, None]
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqc,chd->qhd", p, v.astype(np.float64))


_JITTED = {}


def run_model(model, params, config, token_lists, starts, page_table, kv=None, num_pages=32,
              page_size=4, pad_to=None):
    """Run one step of `model` over several sequences: sequence s feeds token_lists[s] at
    positions starts[s]... Returns (logits [T, V] as numpy, kv)."""
    if kv is None:
        kv = init_kv_cache(config.num_layers, num_pages, page_size, config.num_kv_heads,
                           config.head_dim)
    tokens = np.concatenate([np.asarray(t, np.int32) for t in token_lists])
    positions = np.concatenate([np.arange(s, s + len(t), dtype=np.int32)
                                for t, s in zip(token_lists, starts)])
    q_lens = [len(t) for t in token_lists]
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv_lens = np.asarray([s + n for s, n in zip(starts, q_lens)], np.int32)
    n = len(tokens)
    if pad_to is not None:
        tokens = np.pad(tokens, (0, pad_to - n))
        positions = np.pad(positions, (0, pad_to - n))
    batch = AttentionBatch(np.asarray(page_table, np.int32), kv_lens, cu)
    key = (model.config, jax.numpy.dtype(model.dtype), model.attention)
    fn = _JITTED.setdefault(key, jax.jit(model.apply))
    logits, kv = fn(params, tokens, positions, kv, batch)
    return np.asarray(logits)[:n], kv


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct GGUF, converted to float32 (no conversion cache)."""
    from pensieve_jax.weights import load_model
    return load_model("smollm2-135m-instruct", "float32", cache_dir=False)


@pytest.fixture(scope="session")
def hf_reference():
    """Outputs of Hugging Face transformers on the same GGUF; see fixtures/make_smollm2_reference.py."""
    import json
    ref = json.loads((FIXTURES / "smollm2_reference.json").read_text())
    ref["logits"] = np.load(FIXTURES / ref["logits_file"])["logits"]
    return ref


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop the step programs the runners share process-wide
    (runner/step_compiler.EXECUTABLES) and JAX's caches. XLA's CPU executables keep their code mapped;
    the whole suite in one process segfaulted inside the XLA compiler late in the run (twice,
    at the same test, which passes alone), which points at this growth."""
    yield
    from pensieve_jax.runner import step_compiler
    step_compiler.EXECUTABLES.clear()
    jax.clear_caches()
    gc.collect()
