# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch (the local CPU wheel torch==2.13.0 when the venv has
# no torch), build the C++ extension in place, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: demo test build bench clean cuda-build ptxas

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(VENV)/.deps: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q safetensors huggingface_hub ninja "transformers==5.24.0"
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(PIP) install -q pytest "peft==0.21.2" accelerate "bitsandbytes==0.50.2"
	touch $@

build: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import peftcore; print(peftcore.show_config())"

demo: build
	$(PY) -m peftcore.demo

test: build $(VENV)/.test-deps
	$(PY) -m pytest -q

bench: build $(VENV)/.test-deps
	$(PY) benchmarks/bench_workloads.py --layer
	$(PY) benchmarks/bench_lora_linear.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_model.py --method ia3
	$(PY) benchmarks/bench_model.py --method adalora
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_mixed.py
	$(PY) benchmarks/bench_quant.py
	$(PY) benchmarks/bench_quant.py --isa avx2 --bf16-only
	$(PY) benchmarks/bench_quant_gemm.py
	$(PY) benchmarks/bench_quant_kernel.py
	$(PY) benchmarks/quant_accuracy.py

# ---- CUDA compile check (CI; no GPU needed). A second environment, .venv-cuda, with the
# CUDA 13 build of torch; peftcore built into it (not in place: the tree's _C stays the CPU
# build of .venv) with every CUDA kernel compiled and linked for CUDA_ARCHS; then imported,
# and every peftcore:: op with a CPU kernel must have a CUDA kernel (.ci/check_cuda_ops.py).
# CUDA_ROOT: the toolkit's root (set explicitly: a wrapper nvcc on PATH misleads torch's
# CUDA_HOME detection). The -Xptxas -v report of the build lands in build/ptxas.txt;
# `make ptxas` refreshes the committed benchmarks/ptxas.txt from it.
# CUDA_CHECK_FLAGS: e.g. --allow-missing 'name*' lets a new op land before its CUDA kernel (reported, not failed); empty: every op must have one.
CUDA_VENV  := .venv-cuda
CUDA_PY    := $(CUDA_VENV)/bin/python
CUDA_TORCH ?= torch==2.14.1
CUDA_ROOT  ?= /usr/local/cuda-13.0
CUDA_ARCHS ?= 8.0;9.0a
CUDA_JOBS  ?= 2
CUDA_CHECK_FLAGS ?=

$(CUDA_PY):
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q --upgrade pip setuptools wheel

$(CUDA_VENV)/.deps: $(CUDA_PY) pyproject.toml
	@$(CUDA_PY) -c "import torch; assert torch.version.cuda" 2>/dev/null || $(CUDA_PY) -m pip install -q "$(CUDA_TORCH)"
	$(CUDA_PY) -m pip install -q numpy safetensors huggingface_hub ninja
	touch $@

cuda-build: $(CUDA_VENV)/.deps
	@mkdir -p build
	CUDA_HOME=$(CUDA_ROOT) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" PEFTCORE_BUILD_CUDA=1 MAX_JOBS=$(CUDA_JOBS) \
	  PEFTCORE_PTXAS_VERBOSE=1 $(CUDA_PY) -m pip install -v --no-build-isolation --no-deps . > build/cuda-build.log 2>&1 \
	  || { tail -n 60 build/cuda-build.log; exit 1; }
	@grep -a "peftcore build:" build/cuda-build.log || true
	$(CUDA_PY) benchmarks/ptxas_report.py build/cuda-build.log build/ptxas.txt
	$(CUDA_PY) .ci/check_cuda_ops.py $(CUDA_CHECK_FLAGS)

ptxas: cuda-build
	cp build/ptxas.txt benchmarks/ptxas.txt

clean:
	rm -rf build *.egg-info peftcore/_C*.so
