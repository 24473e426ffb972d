"""ModelRunner: swap-ins loaded inside a step ("layered") equal pages scattered before it."""

import jax.numpy as jnp
import numpy as np
import pytest

from pensieve_jax.runner.model_runner import ModelRunner

from pensieve_jax.runner.step_program import HostPages, StepInput
from pensieve_jax.weights import load_model

PAGE = 8
SMALL = dict(max_num_seqs=4, max_batched_tokens=32, max_model_len=64)   # programs of 8-32 tokens


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny", "float32")


def one_sequence_step(pages, context, new):
    """A step of `new` tokens for one sequence with `context` tokens before them in pages."""
    return StepInput(
        token_ids=np.arange(1, new + 1, dtype=np.int32),
        positions=np.arange(context, context + new, dtype=np.int32),
        page_table=np.asarray([pages], np.int32), kv_lens=np.asarray([context + new], np.int32),
        cu_q_lens=np.asarray([0, new], np.int32), temperature=np.zeros(1, np.float32),
        top_k=np.zeros(1, np.int32), top_p=np.ones(1, np.float32), seeds=np.zeros(1, np.uint32),
        counters=np.zeros(1, np.int32))


def random_pages(model, n, seed):
    c = model.config
    rng = np.random.default_rng(seed)
    shape = (c.num_layers, n, PAGE, c.num_kv_heads, c.head_dim)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(
        np.float32)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
@pytest.mark.parametrize("new", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_pages_loaded_in_the_step_equal_pages_scattered_before_it(model, attention, new):
    k, v = random_pages(model, 3, seed=new)
    ids = [5, 2, 9]                                # not in order; page 11 takes the new tokens
    step = one_sequence_step(ids + [11], 3 * PAGE, new)
    before = ModelRunner(model, 16, PAGE, attention, **SMALL)
    before.scatter_pages(k, v, ids)
    inside = ModelRunner(model, 16, PAGE, attention, layered_loads=True, **SMALL)
    want, got = before.step(step), inside.step(step, HostPages(k, v, ids))
    assert list(got) == list(want)
    np.testing.assert_array_equal(np.asarray(inside.kv.k), np.asarray(before.kv.k))
    np.testing.assert_array_equal(np.asarray(inside.kv.v), np.asarray(before.kv.v))


def test_loading_pages_leaves_other_pages_alone(model):
    """Padding rows of the page bucket are dropped, not written to page 0."""
    runner = ModelRunner(model, 16, PAGE, layered_loads=True, **SMALL)
    k, v = random_pages(model, 1, seed=7)
    runner.scatter_pages(k, v, [0])
    kept = np.asarray(runner.kv.k[:, 0])
    k2, v2 = random_pages(model, 2, seed=8)
    runner.step(one_sequence_step([0, 3, 4, 12], 3 * PAGE, 1), HostPages(k2, v2, [3, 4]))
    np.testing.assert_array_equal(np.asarray(runner.kv.k[:, 0]), kept)
    np.testing.assert_array_equal(np.asarray(runner.kv.k[:, 3:5]), k2)
    assert float(jnp.abs(runner.kv.k[:, 5:12]).max()) == 0.0


@pytest.mark.slow
def test_precompile_covers_every_step_and_page_program(model):
    runner = ModelRunner(model, 17, PAGE, layered_loads=True, **SMALL)  # a pool no other test uses
    assert [s.tokens for s in runner.programs.shapes] == [1, 8, 16, 32] * 2   # CPU: 1 first
    runner.precompile()
    assert runner.ready and len(runner.compiler.compiled) == 8
    k, v = random_pages(model, 2, seed=1)
    runner.step(one_sequence_step([1, 2, 6], 2 * PAGE, 4), HostPages(k, v, [1, 2]))
    runner.step(one_sequence_step([1, 2, 6], 2 * PAGE, 20))   # no pages to load
    runner.step(one_sequence_step([1, 2, 6, 7], 3 * PAGE, 7))
    runner.copy_pages([(1, 3)] * 40)            # more than one chunk
    runner.gather_pages_host([1, 2, 3])
    assert len(runner.compiler.compiled) == 8 and runner.compilations_after_ready == []


def test_a_step_larger_than_the_largest_program_is_refused(model):
    runner = ModelRunner(model, 16, PAGE, **SMALL)
    with pytest.raises(ValueError, match="max_batched_tokens"):
        runner.step(one_sequence_step([1, 2, 6, 7, 8], 0, 33))


@pytest.mark.slow    # ~8 s: compiles both load paths; .ci/run runs it
def test_a_backend_that_cannot_compile_the_load_gets_the_pages_before_the_step(model,
                                                                               monkeypatch):
    k, v = random_pages(model, 3, seed=3)
    ids = [5, 2, 9]
    step = one_sequence_step(ids + [11], 3 * PAGE, 2)
    runner = ModelRunner(model, 18, PAGE, layered_loads=True, **SMALL)   # a pool of its own

    lower = runner.compiler.lower

    def cannot(shape):
        if shape.incoming_pages:
            raise NotImplementedError("no host offloading here")
        return lower(shape)
    monkeypatch.setattr(runner.compiler, "lower", cannot)
    with pytest.warns(UserWarning, match="loaded before it instead"):
        got = runner.step(step, HostPages(k, v, ids))
    assert "no host offloading" in runner.in_step_load_error
    want = ModelRunner(model, 16, PAGE, **SMALL).step(step, HostPages(k, v, ids))
    assert list(got) == list(want)
    np.testing.assert_array_equal(np.asarray(runner.kv.k[:, ids]), k)
