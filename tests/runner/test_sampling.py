"""The jitted sampler: greedy rows, top-k / top-p truncation, per-row seeds."""

import jax.numpy as jnp
import numpy as np

from pensieve_jax.runner.sampler import sample


def run(logits, temperature, top_k, top_p, seeds, counters):
    f = lambda *a: np.asarray(sample(*(jnp.asarray(x) for x in a)))  # noqa: E731
    return f(np.asarray(logits, np.float32), np.asarray(temperature, np.float32),
             np.asarray(top_k, np.int32), np.asarray(top_p, np.float32),
             np.asarray(seeds, np.uint32), np.asarray(counters, np.int32))


def test_greedy_rows_take_argmax_beside_sampled_rows():
    logits = np.random.default_rng(0).standard_normal((3, 50))
    out = run(logits, [0, 1.0, 0], [0, 0, 0], [1, 1, 1], [1, 2, 3], [0, 0, 0])
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_and_top_p_only_pick_allowed_tokens():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 64))
    k2 = run(logits, [1.0] * 64, [2] * 64, [1.0] * 64, np.arange(64), [0] * 64)
    assert set(k2) == {0, 1}
    p = run(logits, [1.0] * 64, [0] * 64, [0.7] * 64, np.arange(64), [0] * 64)
    assert set(p) == {0, 1}                        # 0.5 + 0.3 reaches 0.7
    tiny_p = run(logits[:8], [1.0] * 8, [0] * 8, [0.01] * 8, np.arange(8), [0] * 8)
    assert set(tiny_p) == {0}                      # the top token is always kept


def test_seed_and_counter_make_draws_reproducible():
    logits = np.zeros((4, 1000))
    a = run(logits, [1.0] * 4, [0] * 4, [1.0] * 4, [7, 7, 8, 7], [0, 0, 0, 1])
    b = run(logits, [1.0] * 4, [0] * 4, [1.0] * 4, [7, 7, 8, 7], [0, 0, 0, 1])
    assert (a == b).all()
    assert a[0] == a[1] and a[0] != a[2] and a[0] != a[3]   # uniform over 1000: collisions unlikely
