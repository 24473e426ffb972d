"""The XLA path's one-sequence plan (a step whose prefill rows are one sequence's: chunks of
ONE_ROWS rows over blocks of ONE_KEYS keys, then ONE_TAIL_KEYS) against dense attention in
float64, over contexts long enough for several big blocks, a tail, several row chunks, decodes
beside it, a sliding window, and pages before the window holding NaN."""

import jax.numpy as jnp
import numpy as np
import pytest

from pensieve_jax.model.xla_attention import ONE_KEYS, ONE_ROWS, ONE_TAIL_KEYS, xla_paged_attention
from tests.model.test_attention import windowed_reference
from tests.model.test_attention_mixed import PAGE_SIZE, check, make_batch

# about 12 s in all: run by .ci/run and make test-all; make test keeps the shorter plan tests
# (tests/model/test_attention_mixed.py)
pytestmark = pytest.mark.slow

LONG = 2 * ONE_KEYS + 3 * ONE_TAIL_KEYS + 5          # two big blocks, a tail of four


@pytest.mark.parametrize("q_lens,kv_lens", [
    ([70], [LONG]),                                  # a turn over a long history
    ([ONE_ROWS + 40, 1, 1], [LONG, 9, LONG - 100]),  # two row chunks, decodes beside it
    ([1, 1, 3 * ONE_ROWS], [700, 20, 3 * ONE_ROWS]),  # a long prompt from scratch, last
])
@pytest.mark.parametrize("group", [3, 1])
def test_one_sequence_plan_matches_dense_attention(rng, q_lens, kv_lens, group):
    width = -(-max(kv_lens) // PAGE_SIZE) + 2
    q, kv, batch = make_batch(rng, q_lens, kv_lens, kv_heads=2, group=group,
                              num_tokens=sum(q_lens) + 5, num_seqs=4, width=width,
                              num_pages=4 * width)
    check(q, kv, batch)


def test_one_sequence_plan_with_a_window_never_reads_pages_before_it(rng):
    window = 300
    q_lens, kv_lens = [ONE_ROWS + 20, 1], [LONG, 40]
    width = -(-LONG // PAGE_SIZE)
    q, kv, batch = make_batch(rng, q_lens, kv_lens, kv_heads=2, group=2,
                              num_tokens=sum(q_lens) + 3, num_seqs=2, width=width,
                              num_pages=2 * width + 8)
    first_key = LONG - q_lens[0] - window + 1
    before = set(batch.page_table[0, :first_key // PAGE_SIZE].tolist())
    poisoned = sorted(before - set(batch.page_table[0, first_key // PAGE_SIZE:].tolist())
                      - set(batch.page_table[1].tolist()))
    assert len(poisoned) > ONE_KEYS // PAGE_SIZE
    k, v = np.array(kv.k), np.array(kv.v)
    k[:, poisoned] = np.nan
    v[:, poisoned] = np.nan
    out = np.asarray(xla_paged_attention(jnp.asarray(q), type(kv)(k, v), jnp.int32(0), batch,
                                         sm_scale=0.25, sliding_window=window))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:sum(q_lens)],
                               windowed_reference(q, kv, batch, 0.25, window)[:sum(q_lens)],
                               atol=2e-5)
