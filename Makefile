# Two commands: `make bench-sql` (the main job) and `make test`. Both call `make setup` first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test bench-sql db-start db-stop shell report clean plpython
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# PL/Python 3 for PostgreSQL 15 (Debian), used by `cnnsql db functions install`. Needs root.
plpython:
	@test -f /usr/share/postgresql/15/extension/plpython3u.control || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-plpython3-15; }

test: setup
	$(BIN)/python -m pytest -q tests

bench-sql: setup
	$(BIN)/cnnsql bench

report: setup
	$(BIN)/cnnsql report

shell: setup
	$(BIN)/cnnsql shell

db-start: setup
	$(BIN)/cnnsql db start

db-stop: setup
	$(BIN)/cnnsql db stop

clean:
	-$(BIN)/cnnsql db stop
	rm -rf $(VENV) .cnnsql
