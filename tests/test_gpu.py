"""On a GPU only (marked `gpu`, skipped elsewhere): the compiled Pallas kernel (interpret=False)
against its plain-jnp reference, float32 at matmul precision "highest" (a GPU's default is TF32)
and bfloat16 within pensieve_jax.model.self_check.TOLERANCE; the Triton call in its program; and the
engine with attention="pallas" on the GPU giving the same greedy tokens stateful and stateless.

    python -m pytest -m gpu tests/test_gpu.py
"""

import jax
import numpy as np
import pytest

from pensieve_jax.model import self_check as sc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu",
                                 reason="needs a GPU backend (the compiled kernel)")]

# (q heads, KV heads, head_dim, page_size): Llama-3-8B, SmolLM2-135M (group 3), MHA, tiny
LAYOUTS = [(32, 8, 128, 16), (9, 3, 64, 16), (32, 32, 128, 16), (4, 2, 16, 8)]
# (new tokens, context incl. them): decodes, a prefill, chunks over cached context, an empty row
SEQS = ((1, 1000), (1, 37), (300, 300), (65, 700), (17, 33), (0, 0))


@pytest.fixture
def highest_precision():
    """float32 matmuls at full precision in every thread (the engine's too), then restored."""
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", before)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "h{}_kv{}_d{}_p{}".format(*l))
def test_compiled_kernel_matches_reference(layout, dtype, highest_precision):
    p = sc.random_problem(*layout, dtype, SEQS, seed=7, pad_tokens=3)
    got = sc.kernel_attention(p, interpret=False)
    want = sc.reference_attention(p)
    assert sc.max_abs_err(got, want) <= sc.tolerance(dtype)
    real = int(p.batch.cu_q_lens[-1])
    assert not np.asarray(got[real:], np.float32).any()          # padding rows come back 0


def test_compiled_kernel_program_holds_the_triton_call():
    p = sc.random_problem(32, 8, 128, 16, "bfloat16")
    from pallas_kernels import ragged_paged_attention_stacked
    text = ragged_paged_attention_stacked.lower(p.q, p.kv.k, p.kv.v, p.layer, *p.batch,
                                                sm_scale=p.sm_scale, interpret=False).as_text()
    assert "triton" in text.lower()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_startup_self_check_passes_on_this_gpu(dtype):
    r = sc.attention_self_check(32, 8, 128, 16, dtype)
    assert r.ok and not r.interpret and r.platform == "gpu", r


def _turns(engine, turns, conversation_id):
    from pensieve_jax.engine.sampling import SamplingParams
    seq, outs = [], []
    for new in turns:
        seq = seq + list(new)
        out = engine.submit(seq, SamplingParams(max_tokens=12, ignore_eos=True),
                            conversation_id=conversation_id).result()
        outs.append(list(out.token_ids))
        seq = seq + outs[-1]
    return outs


def test_engine_pallas_stateful_equals_stateless(highest_precision):
    from pensieve_jax.engine.engine import Engine
    rng = np.random.default_rng(3)
    conversations = [[rng.integers(0, 500, n).tolist() for n in (23, 5, 40, 9)]
                     for _ in range(3)]
    opts = dict(max_model_len=256, page_size=16, max_batched_tokens=32, max_num_seqs=4,
                num_pages=96, attention="pallas")
    outs = {}
    for policy in ("stateful", "stateless"):
        with Engine.from_pretrained("random:tiny", "float32", cache_policy=policy,
                                    **opts) as engine:
            stats = engine.stats()
            assert stats["attention"] == "pallas", stats["attention_check"]
            assert stats["attention_check"]["self_check"]["ok"]
            outs[policy] = [_turns(engine, turns, f"c{i}")
                            for i, turns in enumerate(conversations)]
    assert outs["stateful"] == outs["stateless"]


def test_engine_defaults_to_the_self_checked_kernel_on_a_gpu():
    from pensieve_jax.engine.engine import Engine
    with Engine.from_pretrained("random:tiny", "bfloat16", max_model_len=128,
                                max_batched_tokens=16, max_num_seqs=2, num_pages=16) as engine:
        check = engine.stats()["attention_check"]
    assert check["requested"] is None and check["attention"] == "pallas", check
    assert check["self_check"]["ok"] and not check["fallback"]
