# Two entry points for a newcomer:  `make repro` (set up + pull data + run the pipeline) and
# `make test` (set up + pull data + run the tests). Both create the venv and install on first use.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup data repro test deps exps sweep frontier serve loadtest gate wasm clean-venv

# The install: uv (pinned in requirements.lock, installed by the venv's pip) installs the locked
# environment, downloads in parallel and byte-compiled (a fresh machine: 80-100 s, against 193 s for
# pip alone). uv reads no pip.conf, so the folder of local wheels where pip finds torch's CPU build is
# handed on: PIP_FIND_LINKS, else pip's own `global.find-links` setting. Where uv fails (a registry
# it cannot reach, say), pip installs the same locked environment.
$(STAMP): pyproject.toml requirements.lock setup.py $(wildcard iteralite/runtime/native/*.c iteralite/runtime/native/*.h)
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "iteralite needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	links=$${PIP_FIND_LINKS:-$$($(VENV)/bin/pip config get global.find-links 2>/dev/null)}; \
	{ $(VENV)/bin/pip install --quiet --disable-pip-version-check $$(grep '^uv==' requirements.lock) && \
	  $(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python --compile-bytecode \
		$${links:+--find-links "$$links"} -c requirements.lock -e '.[test]'; } \
	|| { echo "setup: uv could not install the environment (above); pip installs it instead"; \
	     $(VENV)/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'; }
	touch $(STAMP)

# The web page's WebAssembly build too, where emscripten is installed (`make wasm` below).
setup: $(STAMP)
	@if command -v $(EMCC) >/dev/null; then $(MAKE) -s --no-print-directory wasm; \
	else echo "setup: no emcc here, so no web/itl.wasm for the web page (install emscripten, then make wasm)"; fi

data: setup
	dvc pull --quiet data/raw.dvc

repro: data
	time dvc repro

# The suite in TEST_WORKERS processes of one torch thread each (pytest-xdist), a test module to a
# worker (its module-scoped clones and fixtures are built once); the critical-path, slow and early
# modules are handed out first (tests/conftest.py), so the longest chain starts at once.
# --no-loadscope-reorder keeps that order: xdist's default hands out the modules with the most tests
# first, which started the real-pipeline modules (five tests each) after six minutes of the rest.
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: data
	OMP_NUM_THREADS=1 python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

# Rewrite every stage's `deps:` in dvc.yaml from its script's import closure (tests/test_dvc_deps.py
# fails until this is run after an import changes); data, checkpoint and C-source deps are kept.
deps: setup
	python -m iteralite.pipeline.deps --write

# The experiments (`dvc exp run`, queued or not) beside the workspace, one row each: the params and
# metrics that differ between them, best mixed_precision validation perplexity first. The --drop
# regex removes the dependency columns (file paths; metric and param columns have no `/` or a `:`).
EXPS_SORT ?= metrics/headline/mixed_precision.json:val_ppl
exps: setup
	dvc exp show --no-pager --only-changed --drop '^[^:]*/[^:]*$$' --sort-by $(EXPS_SORT) --sort-order asc

# The size-quality frontier (docs/experiments.md, "The size-quality frontier"). `make sweep` queues one
# experiment per combination of the grid (each reruns student_tiny and mixed_precision_tiny, plus what
# reads them) and starts one worker (-j 1: two torch jobs on 2 cores thrash). When `dvc queue status`
# shows them done, `make frontier` reads `dvc exp show --json` and writes plots/frontier.csv and .png:
# bytes vs validation perplexity, one point per experiment and target, the Pareto frontier marked.
SWEEP ?= -S 'student.targets.tiny.d_model=24,32,40' -S 'mixed_precision.targets.tiny.target_bits_per_weight=3.0,4.0'
sweep: setup
	dvc exp run --queue $(SWEEP)
	dvc queue start -j 1

frontier: setup
	python -m iteralite.pipeline.frontier

# The working tree's guarded headline metrics (gate.yaml) against those committed at BASE: a markdown
# table, a frontier plot of both (build/gate/gate_frontier.png), exit 1 on a regression beyond tolerance.
BASE ?= HEAD
gate: setup
	python -m iteralite.pipeline.gate --base $(BASE)

# Serve the headline artifact over HTTP (OpenAI-style /v1/completions) on loopback, after `make repro`.
serve: setup
	iteralite serve --checkpoint checkpoints/mixed.safetensors --host 127.0.0.1 --port 8080

# The serving benchmark: 32 streaming clients for 60 s against a server on a free loopback port.
loadtest: setup
	python -m iteralite.serve.loadtest --checkpoint checkpoints/mixed.safetensors --out metrics/serve.json

# The C step, artifact reader, tokenizer and sampler as WebAssembly (web/itl.wasm) for the offline web page
# (web/index.html) and the Node runner (web/itl-node.mjs); needs only emscripten (Debian: `apt-get install
# emscripten`), not the venv. A standalone module with no Emscripten JavaScript glue: web/itl.js loads it.
# NODE_PATH: Debian's emcc needs its acorn module, which a Node from outside Debian does not look for.
EMCC ?= emcc
NATIVE := iteralite/runtime/native
WASM_SRC := $(addprefix $(NATIVE)/,itl_wasm.c itl_artifact.c itl_json.c itl_layout.c itl_codecs.c itl_sha256.c \
	itl_gen.c itl_step.c itl_text.c itl_sample.c itl_rans.c)
WASM_FLAGS := -O3 -std=gnu11 -ffp-contract=off --no-entry -sSTANDALONE_WASM -sALLOW_MEMORY_GROWTH=1
wasm: web/itl.wasm

web/itl.wasm: $(WASM_SRC) $(wildcard $(NATIVE)/*.h)
	NODE_PATH=$${NODE_PATH:+$$NODE_PATH:}/usr/share/nodejs $(EMCC) $(WASM_FLAGS) $(WASM_SRC) -o web/itl.tmp.wasm
	mv web/itl.tmp.wasm $@

clean-venv:
	rm -rf $(VENV)
