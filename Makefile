# make demo : create .venv, install, run the demo on the bundled digits data
# make test : create .venv, install what the default suite needs (the Lightning and Hugging Face
#             integrations and the docs tools included), run it (MARK= runs the slow tests too)
# make docs : install the docs extra, execute examples/*.ipynb into docs/gallery/, build the site
#             into site/ with mkdocs --strict (30-40 s on 2 cores: the notebooks 25-35 s, the build 6 s)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MARK ?= not slow
ARGS ?=
# the extras installed beside the package: the test tools, the integrations the suite tests and
# the docs tools (tests/test_docs_build.py builds the site strictly)
EXTRAS ?= test,lightning,huggingface,docs
DEMO_OUT ?= demo_out

.PHONY: install demo test lint docs bench reproduce oracle clean

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
	$(VENV)/bin/ruff check msam analysis landscape tests benchmarks docs/scripts

docs: install
	$(PY) -m pip install -q -c constraints.txt -e '.[docs]'
	OMP_NUM_THREADS=1 $(PY) docs/scripts/gallery.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: install
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m pip install -q -c constraints.txt $(ORACLE_DEPS)
	$(PY) -m pip install -q --no-deps $(ORACLE_PEERS)  # see `oracle` below: no torchvision
	$(PY) benchmarks/optimizers.py
	$(PY) benchmarks/curvature.py
	$(PY) benchmarks/landscape.py

# agreement with the peer libraries (tests/oracle), in a venv of its own: the peers are installed
# without their dependencies, since curvlinops pulls backpack and with it a torchvision that does
# not load with the CPU torch (and breaks transformers); their own imports need only these
ORACLE_VENV ?= .venv-oracle
ORACLE_PEERS := curvlinops-for-pytorch==3.0.1 hessian-eigenthings==1.0.0a5 pyhessian==0.1
ORACLE_DEPS := einops einconv linear_operator opt-einsum

oracle:
	$(PYTHON) -m venv $(ORACLE_VENV)
	$(ORACLE_VENV)/bin/python -m pip install -q --upgrade pip
	$(ORACLE_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test]' $(ORACLE_DEPS)
	$(ORACLE_VENV)/bin/python -m pip install -q --no-deps $(ORACLE_PEERS)
	$(ORACLE_VENV)/bin/python -m pytest tests/oracle -m oracle -p no:cacheprovider $(ARGS)

reproduce: install
	OMP_NUM_THREADS=1 $(VENV)/bin/landscape reproduce all --out docs/reproduction --markdown docs/REPRODUCTION.md

clean:
	rm -rf $(VENV) $(ORACLE_VENV) $(DEMO_OUT) build site docs/gallery *.egg-info
