# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# What the demo needs alone: the build side (torch, diffusers, onnx) and the runtime; `make test` adds the rest
# to the same venv.
DEMO_STAMP := $(VENV)/.installed-demo
# setuptools' note that an editable install maps the packages (the same for every editable install) is hidden.
PIP := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q

.PHONY: demo test test-fast lint fuzz test-ui test-triton test-cpp test-cpp-all test-cpp-valgrind venv clean

demo: $(DEMO_STAMP)
	$(BIN)/seesr-export demo --out out/demo

# Everything but the native runtime's tests (`make test-cpp` builds it and runs them; CI runs both); the 15
# slowest tests are listed at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 --ignore=tests/test_cpp_runtime.py --ignore=tests/test_ui.py \
		--ignore=tests/test_ui_controls.py
	$(MAKE) --no-print-directory test-ui

# The inner loop: unit and parity tests on the tiny fixture, without the tests marked slow or gpu
# (pyproject.toml), in two processes (pytest-xdist; whole files per process, so module fixtures are set up
# once): while one builds the tests' tiny bundle (cached in out/test-bundles/ until the code changes), the
# other runs the files that need none. The native runtime's tests are `make test-cpp`'s. The 10 slowest are listed.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -n 2 --dist loadfile --durations=10 \
		--ignore=tests/test_cpp_runtime.py

# Style, types and the dependency rules (configured in pyproject.toml): ruff lint and format, mypy (strict on
# the runtime), import-linter (the runtime never imports torch or the build side; no import cycles).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	PYTHONPATH=runtime:. $(BIN)/lint-imports

# The long fuzz campaign (tests/test_fuzz.py under the "long" profile; CI runs the short one with the
# suite). Prints the examples run per target; replay a run with FUZZ_ARGS=--hypothesis-seed=N.
FUZZ_ARGS ?=
fuzz: $(STAMP)
	SEESR_FUZZ=long $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py \
		--hypothesis-show-statistics -W ignore::UserWarning $(FUZZ_ARGS)

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the pinned CPU build: anything else lets pip fetch a multi-GB CUDA torch.
$(DEMO_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -c constraints.txt torch==2.13.0
	$(PIP) -c constraints.txt -e '.[export]'
	touch $@

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -c constraints.txt torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev,quant]'
	# Only its CLIP BPE vocabulary file is used, by the test of CLIP's own vocabulary (skipped without it;
	# the fixtures make their own merges). --no-deps: its torchvision requirement would fetch another torch.
	$(PIP) --no-deps open_clip_torch==3.3.0
	touch $@

# Triton deployment tests against a real tritonserver (nvidia-pytriton's binary, CPU, 127.0.0.1 only).
# Own env: that wheel needs numpy<2; it holds the torch-free runtime alone (editable) with OpenVINO (the
# OpenVINO model's tests), never torch.
# The tiny bundles (standard and turbo) are built on the torch side ($(VENV)); rebuilds are cached.
TRITON_VENV ?= .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
TRITON_WORK := out/triton-test

# `seesr ui` in a headless Chromium (.ci/run installs chromium and chromium-driver), from a venv of its own: the
# torch-free runtime with the `ui` extra, as a user installs it (Gradio also pins Pillow below 13, whose resize
# order the native runtime's tests hold it to), on a tiny bundle the main venv builds.
UI_VENV ?= .venv-ui
UI_STAMP := $(UI_VENV)/.installed
UI_WORK := out/ui-test

test-ui: $(STAMP) $(UI_STAMP)
	$(BIN)/seesr-export fixture --out $(UI_WORK)/checkpoints -q
	$(BIN)/seesr-export build --seesr-root $(UI_WORK)/checkpoints --out $(UI_WORK)/engines/tiny --no-verify -q
	SEESR_TEST_BUNDLE=$(UI_WORK)/engines/tiny $(UI_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_ui_controls.py tests/test_ui.py

$(UI_STAMP): pyproject.toml
	$(PYTHON) -m venv $(UI_VENV)
	$(UI_VENV)/bin/pip install -q --upgrade pip
	$(UI_VENV)/bin/pip install -q -c constraints.txt pytest 'selenium>=4.20' -e '.[ui]'
	touch $(UI_STAMP)

test-triton: $(STAMP) $(TRITON_STAMP)
	$(BIN)/seesr-export fixture --out $(TRITON_WORK)/checkpoints -q
	$(BIN)/seesr-export build --seesr-root $(TRITON_WORK)/checkpoints --out $(TRITON_WORK)/engines/tiny --no-verify -q
	$(BIN)/seesr-export build --seesr-root $(TRITON_WORK)/checkpoints --turbo --out $(TRITON_WORK)/engines/tiny-turbo \
		--no-verify -q
	SEESR_REQUIRE_TRITON=1 SEESR_TEST_BUNDLE=$(TRITON_WORK)/engines/tiny \
		SEESR_TEST_TURBO_BUNDLE=$(TRITON_WORK)/engines/tiny-turbo $(TRITON_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_triton.py tests/test_triton_turbo.py tests/test_triton_openvino.py

$(TRITON_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q 'numpy<2' nvidia-pytriton pytest -e '.[triton,openvino]'
	touch $(TRITON_STAMP)

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(UI_VENV) $(CPP_VENV) out

# The native C++ runtime (runtime/cpp): libseesr and its C ABI. Needs cmake, g++, nlohmann-json3-dev and
# libutf8proc-dev (libpng-dev for seesr-upscale-cpp, valgrind for its memory test); .ci/run installs them.
# `make cpp` needs no torch: it builds against the openvino wheel of a venv of its own ($(CPP_VENV): the
# torch-free runtime and the openvino extra); runtime/cpp/README.md builds against any OpenVINO with plain CMake.
CPP_JOBS ?= 2
CPP_VENV ?= .venv-cpp
CPP_STAMP := $(CPP_VENV)/.installed
CPP_BUILD := runtime/cpp/build
# The CMake package folder of the openvino wheel that the Python $(1) imports.
openvino_cmake = $$($(1) -c "import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), 'cmake'))")

.PHONY: cpp
cpp: $(CPP_STAMP)
	cmake -S runtime/cpp -B $(CPP_BUILD) -DOpenVINO_DIR=$(call openvino_cmake,$(CPP_VENV)/bin/python)
	cmake --build $(CPP_BUILD) -j$(CPP_JOBS)

$(CPP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CPP_VENV)
	$(CPP_VENV)/bin/pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(CPP_VENV)/bin/pip install -q -e '.[openvino]'
	touch $@

# The native runtime's tests (parity with the Python runtime, the C example, the wrapper, memory growth; what CI
# runs) and the compile check of the C and C++ the documents and headers show (tests/test_docs_c.py): all but
# those marked slow (more upscale geometries, bf16: test-cpp-all) and the one under valgrind,
# which takes longer than the rest together (test-cpp-valgrind). The parity tests compare with the Python
# OpenVINO backend, so the library is configured against the test venv's openvino here (the tests build it).
CPP_PYTEST := SEESR_CPP_JOBS=$(CPP_JOBS) $(BIN)/python -m pytest -q -p no:cacheprovider --durations=10
.PHONY: cpp-test-build
cpp-test-build: $(STAMP)
	cmake -S runtime/cpp -B $(CPP_BUILD) -DOpenVINO_DIR=$(call openvino_cmake,$(BIN)/python)

test-cpp: cpp-test-build
	$(CPP_PYTEST) -m "not slow and not valgrind" tests/test_cpp_runtime.py tests/test_docs_c.py

test-cpp-all: cpp-test-build
	$(CPP_PYTEST) -m "not valgrind" tests/test_cpp_runtime.py tests/test_docs_c.py

# One upscale under valgrind's memcheck: no invalid access, no leak (tests/test_cpp_runtime.py, marked valgrind).
test-cpp-valgrind: cpp-test-build
	$(CPP_PYTEST) -m valgrind tests/test_cpp_runtime.py
