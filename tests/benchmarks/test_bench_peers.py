import json

import gguf
import numpy as np
import pytest

import bench_peers
from peers import llama_cpp_peer
from peers.divergence import divergence_prefix, first_divergence
from peers.f32_gguf import gguf_tensors, write_f32_gguf
from pensieve_jax.weights import load_model
from pensieve_jax.weights.gguf_file import unpermute_rope_rows


def test_f32_gguf_holds_our_weights_in_llama_cpp_layout(tmp_path):
    """The written file, read back and un-permuted the way our GGUF loader does, gives the
    loaded parameters exactly (the round trip the llama.cpp peer relies on)."""
    model = load_model("random:tiny")
    cfg = model.config
    path = tmp_path / "tiny-f32.gguf"
    info = write_f32_gguf(model, path)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert info["tensors"] == len(tensors) == 3 + 9 * cfg.num_layers  # untied: output.weight
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.ALL_F32
    assert reader.get_field("llama.vocab_size").contents() == cfg.vocab_size

    def read(name):
        t = tensors[name]
        return np.asarray(t.data, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))

    p = model.params["params"]
    layers = p["layers"]
    q = unpermute_rope_rows(read("blk.1.attn_q.weight"), cfg.num_heads)
    k = unpermute_rope_rows(read("blk.1.attn_k.weight"), cfg.num_kv_heads)
    np.testing.assert_array_equal(q.T, np.asarray(layers["q_proj"]["kernel"][1]))
    np.testing.assert_array_equal(k.T, np.asarray(layers["k_proj"]["kernel"][1]))
    np.testing.assert_array_equal(read("blk.0.ffn_down.weight").T,
                                  np.asarray(layers["down_proj"]["kernel"][0]))
    np.testing.assert_array_equal(read("token_embd.weight"), np.asarray(p["embed_tokens"]["embedding"]))
    np.testing.assert_array_equal(read("output.weight").T, np.asarray(p["lm_head"]["kernel"]))
    # the permutation is a real one (the test would not notice a missing permute otherwise)
    assert not np.array_equal(read("blk.1.attn_q.weight").T, np.asarray(layers["q_proj"]["kernel"][1]))
    assert sum(1 for _ in gguf_tensors(model.params, cfg)) == len(tensors)


def test_first_divergence_names_turn_and_token():
    assert first_divergence([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    d = first_divergence([[1, 2], [3, 4, 5]], [[1, 2], [3, 9, 5]])
    assert d["turn_index"] == 1 and d["token_index"] == 1
    assert d["pensieve"] == 4 and d["llama.cpp"] == 9


def test_divergence_prefix_is_the_conversation_so_far():
    prompts = [(0, [1, 2]), (0, [3]), (1, [7, 7]), (0, [4])]
    tokens = [[10, 11], [12], [70], [13, 14]]
    assert divergence_prefix(prompts, tokens, 3, 1) == [1, 2, 10, 11, 3, 12, 4, 13]
    assert divergence_prefix(prompts, tokens, 2, 0) == [7, 7]


@pytest.mark.slow   # an engine start (compiles); `make test-all` runs it
def test_bench_peers_smoke(tmp_path):
    out = tmp_path / "peers.json"
    result = bench_peers.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["smoke"] and saved["model"] == "random:tiny"
    assert set(saved["summary"]) == {"decode_b1", "prefill_512", "conversation_8",
                                     "conversations_8x4"}
    for row in saved["summary"].values():
        assert row["pensieve"]["median"] > 0
    assert len(saved["summary"]["conversation_8"]["pensieve"]["ttft_by_turn_s"]) == 3
    assert saved["memory_bandwidth"]["read_gbs"] > 0
    assert saved["decode_floor"]["decode_percent_of_floor"]["pensieve"] > 0
    assert saved["memory_bandwidth"]["matmul_peak"]["gflops"] > 0
    assert 0 < saved["prefill_floor"]["prefill_percent_of_floor"]["pensieve"]
    assert saved["pensieve"]["compilations_after_ready"] == 0
    assert all(m["loadavg_before"] is not None for m in saved["measurements"])
    ok, _ = llama_cpp_peer.available()
    if ok:
        assert result["systems"] == ["pensieve", "llama.cpp"]
        assert saved["summary"]["decode_b1"]["ratio_pensieve_over_llama_cpp"] > 0
        assert isinstance(saved["tokens_match"], bool)
    else:   # the peer is optional: skipped, and the JSON says why
        assert result["systems"] == ["pensieve"]
        assert not saved["peer"]["available"] and "llama-cpp-python" in saved["peer"]["skipped"]
        assert saved["tokens_match"] is None
