# `make demo` and `make test` work on a fresh clone with nothing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU wheel of torch lies on disk here; never let pip resolve an unpinned torch (a CUDA
# build of several GB).
TORCH_SPEC ?= torch==2.13.0
NVCC   ?= $(shell command -v nvcc)
CUDA_ARCHS ?= 80 90
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: all demo test test-fast cuda-check gpu-compile-check bench bench-extras learning build env clean abi integrations

all: test

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "triton>=3.6" ninja numpy pytest hypothesis "transformers==5.10.4" safetensors matplotlib tqdm "peft==0.21.2"
	touch $@

# The real trainers the integration tests run against, pinned (tests/test_integration_*.py);
# torch is held at the wheel above. OpenRLHF's package import needs deepspeed and flash-attn: only
# its files are installed, and the test loads its torch-only openrlhf/models/loss.py on its own.
INTEGRATIONS := "trl==1.16.0" "verl==0.9.1"
$(VENV)/.integrations: $(VENV)/.deps
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt $(INTEGRATIONS)
	$(PIP) install -q --no-deps "openrlhf==0.11.2"
	touch $@

integrations: $(VENV)/.integrations

# Editable install builds alignops._C with the torch already in the venv.
$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	flock $(VENV)/.build.lock $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

env: build
	$(PY) -m alignops.env

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
# registers, spills and shared memory -> bench/results/gpu-compile-check.{md,csv}
# csrc/common/policy_abi.h from the one-launch kernel's table (alignops/policy/kernel_abi.py)
abi: $(VENV)/.deps
	$(PY) -c "from alignops.policy.kernel_abi import write_header; write_header()"

gpu-compile-check: build
	$(PY) -m bench.gpu_compile_check

test: build integrations cuda-check gpu-compile-check
	$(PY) -m alignops.env
	ALIGNOPS_REQUIRE_INTEGRATIONS=1 $(PY) -m pytest tests

test-fast: build
	$(PY) -m pytest tests -x -q -p no:cacheprovider -k "not slow"

demo: build
	$(PY) -m alignops.demo

bench: build
	$(PY) -m bench.run

# The peers bench/bench_fused_linear.py measures against, pinned: TRL with the integrations above;
# Liger without its dependencies (its kernels need none; a peer that does not import is left out of
# the table, with the reason)
bench-extras: $(VENV)/.integrations
	$(PIP) install -q --no-deps "liger-kernel==0.8.5"

# Every method from the same SFT base, same budget and seed -> bench/results/learning.{md,png}
learning: build
	$(PY) -m bench.learning

clean:
	rm -rf build *.egg-info alignops/_C*.so alignops/_cpu_*.so alignops/_build_info.json $(VENV)
