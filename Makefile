# Conventional entry points: `make demo` and `make test` are README's two commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= /tmp/lookalike-demo
PYTEST_ARGS ?=

.PHONY: install demo test bench-quick sdist lock clean

# Every benchmark's --quick mode (each under 5 minutes; needs ../shared/data).
bench-quick: install
	$(BIN)/pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python -m bench.model --quick
	$(BIN)/python -m bench.pipeline --quick
	$(BIN)/python -m bench.index --quick
	$(BIN)/python -m bench.serving --quick

install: $(STAMP)

# A no-op when .venv is newer than setup.py and constraints.txt.
$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/lookalike demo --workdir $(WORKDIR)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

sdist: install
	$(BIN)/python -m build --sdist --no-isolation --outdir dist .

lock:
	rm -rf /tmp/lookalike-lock && $(PYTHON) -m venv /tmp/lookalike-lock
	/tmp/lookalike-lock/bin/pip install --quiet -e ".[test,bench]"  # every extra constraints.txt pins (dask comes with test)
	/tmp/lookalike-lock/bin/pip freeze --all --exclude-editable | grep -v -e '^lookalike' -e '^pip==' > constraints.body
	{ sed -n '/^#/p' constraints.txt; cat constraints.body; } > constraints.new && rm constraints.body
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) build dist *.egg-info
