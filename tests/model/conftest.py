import pytest

# test_families.py: make test runs the engine's stateful == stateless check for the two
# families whose attention differs most (mistral's sliding window, qwen3's per-head norms); the
# rest are slow (rope scalings and biases are checked against transformers' logits in make
# test; .ci/run runs every family through the engine)
SLOW_FAMILY_ENGINE_TESTS = {f"test_stateful_equals_stateless[{f}]"
                            for f in ("llama-dynamic", "llama-yarn", "qwen2")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in SLOW_FAMILY_ENGINE_TESTS:
            item.add_marker(pytest.mark.slow)
