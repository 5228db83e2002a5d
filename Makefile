# `make run` and `make test` set everything up themselves on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of this torch version lies on disk on our machines; a looser spec would pull a
# multi-GB CUDA build. Users' machines take PyPI's torch through the project's own range.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" || $(PY) -m pip install --quiet "torch>=2.2"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: install
	$(VENV)/bin/ragq serve

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the end-to-end tests that start workers, `ragq serve` or benchmarks (marked `slow`).
test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .ragq .pytest_cache
