import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="package")
def tiny_engine():
    """One random:tiny engine for the benchmark tests (each new step shape compiles once)."""
    from pensieve_jax.engine.engine import Engine
    # Big pages and a small token budget keep the number of step shapes (compilations) small.
    engine = Engine.from_pretrained("random:tiny", max_num_seqs=2, max_model_len=512,
                                    max_batched_tokens=64, page_size=64)
    yield engine
    print("tiny engine compilations:", engine.stats()["compilations"])
    engine.shutdown()
