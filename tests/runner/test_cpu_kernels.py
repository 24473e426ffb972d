"""The runner with the CPU kernels (cpu_kernels/) against plain XLA: the same tokens and pools
(to float32 rounding)
on decode and mixed steps over cached pages, the kernel inside the compiled program, and the
runner's stats saying which it runs."""

import numpy as np
import pytest

import cpu_kernels
from pensieve_jax.runner.model_runner import ModelRunner
from pensieve_jax.runner.step_program import StepInput
from pensieve_jax.weights import load_model

PAGE = 8
SMALL = dict(max_num_seqs=4, max_batched_tokens=32, max_model_len=64)

pytestmark = pytest.mark.skipif(not cpu_kernels.load(), reason=cpu_kernels.status())


def step(contexts, new):
    """Sequence i has contexts[i] cached tokens and new[i] new ones; its pages are 8i.."""
    tokens, positions, cu = [], [], [0]
    for i, (c, n) in enumerate(zip(contexts, new)):
        tokens += list(range(3 + i, 3 + i + n))
        positions += list(range(c, c + n))
        cu.append(cu[-1] + n)
    s = len(contexts)
    table = np.asarray([[8 * i + j for j in range(8)] for i in range(s)], np.int32)
    return StepInput(np.asarray(tokens, np.int32), np.asarray(positions, np.int32), table,
                     np.asarray([c + n for c, n in zip(contexts, new)], np.int32),
                     np.asarray(cu, np.int32), np.zeros(s, np.float32), np.zeros(s, np.int32),
                     np.ones(s, np.float32), np.zeros(s, np.uint32), np.zeros(s, np.int32))


@pytest.fixture(scope="module")
def runners():
    model = load_model("random:tiny", "float32")
    c = model.config
    rng = np.random.default_rng(0)
    shape = (c.num_layers, 32, PAGE, c.num_kv_heads, c.head_dim)
    k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    out = {}
    for on in (True, False):
        runner = ModelRunner(model, 33, PAGE, "xla", cpu_kernels=on, **SMALL)
        runner.scatter_pages(k, v, list(range(32)))
        out[on] = runner
    return out


@pytest.mark.parametrize("contexts,new", [([5, 17, 30], [1, 1, 1]),     # decodes
                                          ([0, 12, 40], [6, 1, 1]),     # a prefill + decodes
                                          ([9, 20], [4, 3])])           # two prefills
def test_same_tokens_and_pools_as_plain_xla(runners, contexts, new):
    s = step(contexts, new)
    assert list(runners[True].step(s)) == list(runners[False].step(s))
    # the new rows' K/V of later layers follow the earlier layers' attention: equal up to
    # float32 rounding (the kernel sums in another order)
    on, off = runners[True].kv, runners[False].kv
    for a, b in ((on.k, off.k), (on.v, off.v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_kernel_is_in_the_program_and_stats_say_which(runners):
    texts = {on: [e.as_text() for e in r.compiler.compiled.values()]
             for on, r in runners.items()}
    assert texts[True] and all(cpu_kernels.DECODE_ATTENTION in t for t in texts[True])
    assert texts[False] and not any(cpu_kernels.DECODE_ATTENTION in t for t in texts[False])
    assert runners[True].report_stats()["programs"]["cpu_kernels"] == "on"
    assert runners[False].report_stats()["programs"]["cpu_kernels"].startswith("off: not asked")
