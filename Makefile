# Two commands for a newcomer: `make demo` and `make test`.
# Both create .venv when missing and install the project with pinned versions;
# re-running is fast because installation is skipped while pyproject.toml and
# requirements.lock are unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test demo bench clean lock

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

# Two pytest workers: the tests that start clusters and servers run in order on one, the others beside them.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/detr demo

# Regenerate requirements.lock from the current environment (after changing dependencies).
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^raydetr' > requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
