# The two commands of the README; each sets itself up (.venv in the checkout, editable install).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install export check-export nbtest pytest bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fasterai.demo

# make test: exported modules must match the notebooks, then the notebooks, then pytest.
test: $(STAMP)
	$(MAKE) --no-print-directory check-export
	$(MAKE) --no-print-directory nbtest
	$(MAKE) --no-print-directory pytest

check-export: $(STAMP)
	$(VENV)/bin/nbdev-export
	$(PY) tools/readme.py
	@if [ -n "$$(git status --porcelain -- fasterai README.md)" ]; then \
	  echo "fasterai/ or README.md differ from what the notebooks export:"; \
	  git status --porcelain -- fasterai README.md; git --no-pager diff --stat -- fasterai README.md; exit 1; fi
	@echo "export check: fasterai/ matches nbs/"

nbtest: $(STAMP)
	$(VENV)/bin/nbdev-test --n-workers 2 --timing

pytest: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/run_all.py

export: $(STAMP)
	$(VENV)/bin/nbdev-export
	$(PY) tools/readme.py

clean:
	rm -rf $(VENV) _proc _docs build *.egg-info
