# The two commands of the README; each sets itself up (.venv in the checkout, editable install).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-threads install export check-export nbtest pytest bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fasterai.demo

# make test: exported modules must match the notebooks, then the notebooks and pytest (see nbtest below).
test: $(STAMP)
	$(MAKE) --no-print-directory check-export
	$(MAKE) --no-print-directory -j3 -Otarget nbtest-rest nbtest-long pytest

# make test-threads: the notebooks under each of THREADS with each of SEEDS, and pytest under each of THREADS.
# Run it before resolving anything that touches a trained or measured outcome (README, "For contributors").
THREADS ?= 1 4
SEEDS ?= 0 1
test-threads: $(STAMP)
	@set -e; for t in $(THREADS); do \
	  for s in $(SEEDS); do echo "== notebooks: $$t thread(s), seed $$s"; \
	    FASTERAI_TEST_THREADS=$$t OMP_NUM_THREADS=$$t FASTERAI_TEST_SEED=$$s $(MAKE) --no-print-directory nbtest; done; \
	  echo "== pytest: $$t thread(s)"; FASTERAI_TEST_THREADS=$$t OMP_NUM_THREADS=$$t $(MAKE) --no-print-directory pytest; done

check-export: $(STAMP)
	$(VENV)/bin/nbdev-export
	$(PY) tools/readme.py
	@if [ -n "$$(git status --porcelain -- fasterai README.md)" ]; then \
	  echo "fasterai/ or README.md differ from what the notebooks export:"; \
	  git status --porcelain -- fasterai README.md; git --no-pager diff --stat -- fasterai README.md; exit 1; fi
	@echo "export check: fasterai/ matches nbs/"

# The longest notebook (the MiniLM tutorial, ~5 min on one thread) would start last in nbdev-test's sorted order and
# finish alone. So it runs from the start beside the other notebooks, and `make test` runs pytest beside both
# (-j3; every notebook and test runs on one thread, so three lanes share the two cores without spinning).
# -Otarget prints each lane's output whole when it is done. Every lane must pass.
LONG_NB := nbs/tutorials/minilm.ipynb
.PHONY: nbtest-rest nbtest-long
nbtest: $(STAMP)
	$(MAKE) --no-print-directory -j2 -Otarget nbtest-rest nbtest-long

nbtest-rest: $(STAMP)
	$(VENV)/bin/nbdev-test --n-workers 2 --timing --skip-file-re '^minilm\.ipynb$$'

nbtest-long: $(STAMP)
	$(VENV)/bin/nbdev-test $(LONG_NB) --timing

pytest: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/run_all.py

export: $(STAMP)
	$(VENV)/bin/nbdev-export
	$(PY) tools/readme.py

clean:
	rm -rf $(VENV) _proc _docs build *.egg-info
