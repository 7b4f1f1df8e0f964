# make demo : create .venv, install, run the demo on the bundled digits data
# make test : create .venv, install, run the test suite (MARK= runs the slow tests too)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MARK ?= not slow
ARGS ?=
# optional extras to install beside the test tools (CI adds the framework integrations)
EXTRAS ?= test
DEMO_OUT ?= demo_out

.PHONY: install demo test lint bench reproduce clean

comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/landscape demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -m "$(MARK)" $(ARGS)

lint: install
	$(VENV)/bin/ruff check msam analysis landscape tests benchmarks

bench: install
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/optimizers.py
	$(PY) benchmarks/curvature.py
	$(PY) benchmarks/landscape.py

reproduce: install
	OMP_NUM_THREADS=1 $(VENV)/bin/landscape reproduce all --out docs/reproduction --markdown docs/REPRODUCTION.md

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
