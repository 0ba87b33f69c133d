# `make demo` and `make test` work on a fresh clone with nothing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# This development machine has no GPU: its .venv takes the CPU wheel of torch that lies on disk
# here (pip would otherwise resolve a CUDA build of several GB). On a GPU box, install into the
# environment that already has torch instead (README, "Install").
TORCH_SPEC ?= torch==2.13.0
# The oldest triton the GPU kernels must compile with (the GPU machines'): gpu-compile-check
# compiles with it as well as with the newest, which the venv runs.
TRITON_OLDEST := 3.6.0
# Liger-Kernel, whose chunked losses the preference and distillation tests and benchmarks are held
# to: its own files only (it needs nothing beyond torch and triton for them).
LIGER_VERSION := 0.8.5
# DeepSpeed, for the ZeRO-2/3 runs of TRL at 2 processes (`make test-all`): its CPU accelerator and the
# Python packages it imports, without its other requirements (which would re-resolve torch).
DEEPSPEED_SPEC := deepspeed==0.19.8 hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2
NVCC   ?= $(shell command -v nvcc)
CUDA_ARCHS ?= 80 90
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
PKG_SRC := $(shell find alignops kernels -name '*.py') setup.py pyproject.toml MANIFEST.in LICENSE
# The requirements of the package's extras (pyproject.toml), shell-quoted: one list for the venv,
# a user's `pip install "alignops[...]"` and the wheel's metadata.
extras = $(shell $(PYTHON) -c 'import sys, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; print(" ".join(repr(r) for e in sys.argv[1:] for r in d[e]))' $(1))
# The op tests, which need nothing but torch, triton and the test tools: `make test` runs them
# against the wheel installed in a clean virtualenv; the rest run in .venv.
OP_TESTS := test_token_logprobs test_policy_loss test_policy_epilogue test_mask_semantics test_fused_linear \
            test_advantages test_value_loss test_sft test_preference test_triton_kernels test_cuda_kernels \
            test_cpu_isa test_no_silent_fallback test_vocab_parallel test_sizes test_distill
# Under `make test` a backend that should run here and cannot fails the run (tests/conftest.py).
TEST_ENV := ALIGNOPS_REQUIRE_BACKENDS=auto ALIGNOPS_REQUIRE_INTEGRATIONS=1
PYTEST_JOBS ?= 2

.PHONY: all demo test test-all test-fast op-tests rest-tests cuda-check gpu-compile-check gpu-compile-check-full \
        gpu-dry-run wheel wheel-check bench bench-extras learning build env clean abi integrations fuzz

all: test

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt $(call extras,triton train dev) build
	touch $@

# The real trainers the integration tests run against, pinned by the extras (tests/test_integration_*.py);
# torch is held at the wheel above. OpenRLHF's package import needs deepspeed and flash-attn: only
# its files are installed, and the test loads its torch-only openrlhf/models/loss.py on its own.
$(VENV)/.integrations: $(VENV)/.deps
	$(PIP) install -q -c $(VENV)/torch-constraint.txt $(call extras,trl verl)
	$(PIP) install -q --no-deps $(call extras,openrlhf)
	$(PIP) install -q --no-deps "liger-kernel==$(LIGER_VERSION)"
	touch $@

integrations: $(VENV)/.integrations

$(VENV)/.deepspeed: $(VENV)/.integrations
	$(PIP) install -q --no-build-isolation --no-deps $(DEEPSPEED_SPEC)
	touch $@

# Editable install builds alignops._C with the torch already in the venv. The objects live in
# build/objects-*, shared with `make wheel`, which then only links and packs.
$(VENV)/.built: $(VENV)/.deps $(CSRC) setup.py
	flock $(VENV)/.build.lock $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

env: build
	$(PY) -m alignops.env

# The wheel and the sdist a user would build (dist/); the wheel reuses the editable build's objects.
dist/.wheel: $(VENV)/.built $(PKG_SRC) $(CSRC)
	rm -rf dist
	flock $(VENV)/.build.lock $(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	$(PY) -m build -q --sdist -o dist . > /dev/null
	touch $@

wheel: dist/.wheel

# The wheel installed into a clean virtualenv (torch, the triton extra, the test tools; no source
# tree on the path): its contents and the sdist are checked, then the op tests run from a copy of
# tests/ outside the tree, against site-packages.
WHEEL_VENV := $(VENV)-wheel
$(WHEEL_VENV)/.deps: pyproject.toml
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(WHEEL_VENV)/bin/pip install -q -c $(VENV)/torch-constraint.txt $(call extras,triton dev)
	touch $@

wheel-check: dist/.wheel $(WHEEL_VENV)/.deps
	$(WHEEL_VENV)/bin/pip uninstall -q -y alignops 2>/dev/null || true
	$(WHEEL_VENV)/bin/pip install -q -c $(VENV)/torch-constraint.txt dist/*.whl
	$(WHEEL_VENV)/bin/pip check
	$(PY) tools/check_dist.py dist --build-sdist $(CURDIR)/$(WHEEL_VENV)/bin/python

op-tests: wheel-check
	d=$$(mktemp -d) && cp -r tests $$d/ && cd $$d && \
	  $(TEST_ENV) ALIGNOPS_EXPECT_INSTALLED=1 ALIGNOPS_CHECKOUT=$(CURDIR) $(CURDIR)/$(WHEEL_VENV)/bin/python -m pytest \
	  -c $(CURDIR)/pyproject.toml --rootdir $$d -p no:cacheprovider -n $(PYTEST_JOBS) -m "not slow" \
	  $(foreach t,$(OP_TESTS),tests/$(t).py); rc=$$?; rm -rf $$d; exit $$rc

rest-tests: build integrations
	$(TEST_ENV) $(PY) -m pytest tests -n $(PYTEST_JOBS) -m "not slow" $(foreach t,$(OP_TESTS),--ignore=tests/$(t).py)

# Compile-check every CUDA source for sm_80 and sm_90 (no GPU needed, no torch headers used).
cuda-check:
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found, CUDA sources NOT compile-checked"; \
	else for f in csrc/cuda/*.cu; do \
	  echo "nvcc $$f ($(CUDA_ARCHS))"; \
	  $(NVCC) -std=c++17 -O3 -Icsrc $(foreach a,$(CUDA_ARCHS),-gencode=arch=compute_$(a),code=sm_$(a)) \
	    -gencode=arch=compute_90,code=compute_90 \
	    -c $$f -o /tmp/alignops-$$(basename $$f).o || exit 1; \
	done; fi

# Compile every Triton kernel variant the launchers produce for sm_80 and sm_90 ahead of time
# (no GPU needed; the interpreter does not catch what the GPU compiler rejects) and check
# registers, spills and shared memory, with the newest triton and with $(TRITON_OLDEST).
# `make test` compiles only the variants that bench/results/gpu-compile-check.json lacks;
# `make gpu-compile-check-full` compiles all and records them (commit the record).
TRITON_OLDEST_DIR := $(VENV)/triton-$(TRITON_OLDEST)
$(TRITON_OLDEST_DIR)/.installed: $(VENV)/.deps
	$(PIP) install -q --no-deps --target $(TRITON_OLDEST_DIR) "triton==$(TRITON_OLDEST)"
	touch $@

gpu-compile-check: build $(TRITON_OLDEST_DIR)/.installed
	$(PY) -m bench.gpu_compile_check --changed-only
	PYTHONPATH=$(TRITON_OLDEST_DIR) $(PY) -m bench.gpu_compile_check --changed-only

gpu-compile-check-full: build $(TRITON_OLDEST_DIR)/.installed
	$(PY) -m bench.gpu_compile_check
	PYTHONPATH=$(TRITON_OLDEST_DIR) $(PY) -m bench.gpu_compile_check

# csrc/common/policy_abi.h from the one-launch kernel's table (alignops/policy/kernel_abi.py)
abi: $(VENV)/.deps
	$(PY) -c "from alignops.policy.kernel_abi import write_header; write_header()"

# bench/gpu.sh's steps on CPU at toy sizes, so the one-shot GPU script cannot rot.
gpu-dry-run: build
	rm -rf $(VENV)/gpu-dry-run && OUT=$(VENV)/gpu-dry-run PY=$(PY) bash bench/gpu.sh --dry-run

# Everything; the two test halves in sequence (each uses both cores).
test: build integrations cuda-check gpu-compile-check
	$(PY) -m alignops.env
	$(MAKE) --no-print-directory op-tests
	$(MAKE) --no-print-directory rest-tests
	$(MAKE) --no-print-directory gpu-dry-run

# tests/test_fuzz.py's harness over the whole logits surface for longer than make test gives it
# (FUZZ_EXAMPLES drawn cases; ~10 a second here); a failure is saved in .hypothesis/ and replayed
# first next time: keep it as an @example on the test, saying what it found.
FUZZ_EXAMPLES ?= 3000
fuzz: build
	ALIGNOPS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(TEST_ENV) $(PY) -m pytest tests/test_fuzz.py -n 0 -p no:cacheprovider \
	  --hypothesis-show-statistics

# make test plus the tests marked slow (large shapes; TRL under DeepSpeed ZeRO-2/3 at 2 processes)
test-all: test $(VENV)/.deepspeed
	$(TEST_ENV) $(PY) -m pytest tests -n $(PYTEST_JOBS) -m slow

test-fast: build
	$(PY) -m pytest tests -x -q -p no:cacheprovider -n $(PYTEST_JOBS) -k "not slow"

demo: build
	$(PY) -m alignops.demo

bench: build
	$(PY) -m bench.run

# The peers bench/bench_fused_linear.py measures against, pinned: TRL with the integrations above;
# Liger without its dependencies (its kernels need none; a peer that does not import is left out of
# the table, with the reason)
bench-extras: $(VENV)/.integrations

# Every method from the same SFT base, same budget and seed -> bench/results/learning.{md,png}
learning: build
	$(PY) -m bench.learning

clean:
	rm -rf build dist *.egg-info alignops/_C*.so alignops/_cpu_*.so alignops/_build_info.json $(VENV) $(WHEEL_VENV)
