# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch (the local CPU wheel torch==2.13.0 when the venv has
# no torch), build the C++ extension in place, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: demo test build bench clean

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
	$(PY) benchmarks/bench_lora_linear.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_model.py --method ia3
	$(PY) benchmarks/bench_model.py --method adalora
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_mixed.py
	$(PY) benchmarks/bench_quant.py --fp32
	$(PY) benchmarks/bench_quant.py --isa avx2

clean:
	rm -rf build *.egg-info peftcore/_C*.so
