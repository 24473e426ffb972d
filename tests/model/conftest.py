import pytest

# test_families.py: make test runs the engine's stateful == stateless check for mistral (the
# family whose attention differs most: a sliding window) and transformers' logits for
# llama-dynamic (dynamic NTK RoPE, q/k/v/o biases), mistral and qwen3 (YaRN RoPE, per-head
# norms); the other cases are slow (.ci/run runs the whole file: every family through the engine)
SLOW_FAMILY_TESTS = (
    {f"test_stateful_equals_stateless[{f}]"
     for f in ("llama-dynamic", "llama-yarn", "qwen2", "qwen3")}
    | {f"test_logits_match_transformers[{f}]" for f in ("llama-yarn", "qwen2")})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in SLOW_FAMILY_TESTS:
            item.add_marker(pytest.mark.slow)
