# Two commands: `make demo` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt requirements-offline.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast venv clean

$(STAMP): pyproject.toml constraints.txt requirements-offline.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PIP) install --quiet -c constraints.txt --no-deps -r requirements-offline.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tvrn demo

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)  # the suite without the tests marked slow (trainings, torchrun, browsers): about a minute
	$(PY) -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
