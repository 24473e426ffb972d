"""A turn's cached_disk_tokens (the part of cached_tokens loaded back from page files) reaches
gRPC's Usage message and the HTTP gateway's usage objects unchanged."""

from pensieve_jax.engine.request import Usage
from serving.http.usage import completion_usage, response_usage
from serving.protocol import usage_from_proto, usage_to_proto


def test_cached_disk_tokens_cross_grpc_and_http():
    usage = Usage(prompt_tokens=100, cached_tokens=64, prefilled_tokens=30, recomputed_tokens=6,
                  completion_tokens=8, ttft_s=0.5, total_s=1.0, cached_disk_tokens=48)
    msg = usage_to_proto(usage)
    assert msg.cached_disk_tokens == 48
    back = usage_from_proto(msg)
    assert back.cached_disk_tokens == 48 and back.cached_tokens == 64
    chat = completion_usage(msg)
    assert chat["prompt_tokens_details"] == {"cached_tokens": 64}
    assert chat["pensieve"]["cached_disk_tokens"] == 48
    assert response_usage(msg)["pensieve"]["cached_disk_tokens"] == 48
