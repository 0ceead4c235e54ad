# Two commands: `make bench-sql` (the main job) and `make test`. Both call `make setup` first.
PYTHON ?= python3.11
# GPU=1: a separate venv, .venv-gpu, with the CUDA builds of PyTorch and TensorFlow from PyPI (same
# versions, everything else as pinned); the default CPU venv .venv is never touched. Every target
# (make bench-sql GPU=1, make test GPU=1, ...) then uses .venv-gpu. Not run here: no GPU machine.
GPU ?=
GPU_INDEX ?= https://pypi.org/simple
ifeq ($(GPU),1)
VENV := .venv-gpu
BENCH_ARGS ?= --device cuda --engines torch,tensorflow
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-data peer-evadb bench-sql db-start db-stop shell report clean plpython chromium pgbouncer \
	docker-bench docker-test
# setup: the venv, and PL/Python for the in-PostgreSQL placement (installed as root with apt-get;
# otherwise one line names the package to install). test also wants chromium and pgbouncer.
setup: $(STAMP) plpython

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[test]"
ifeq ($(GPU),1)
	$(BIN)/python -m pip uninstall --quiet -y torch tensorflow-cpu
	$(BIN)/python -m pip freeze --exclude-editable > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet --index-url $(GPU_INDEX) -c $(VENV)/constraints.txt \
	  "torch==$$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)" \
	  "tensorflow[and-cuda]==$$(sed -n 's/.*"tensorflow-cpu==\([^"]*\)".*/\1/p' pyproject.toml)"
	$(BIN)/python -c "import torch, tensorflow as tf; print('torch CUDA build', torch.version.cuda, \
	  '- GPUs', torch.cuda.device_count(), '| TensorFlow CUDA build', tf.test.is_built_with_cuda(), \
	  '- GPUs', len(tf.config.list_physical_devices('GPU')))"
endif
	@touch $(STAMP)

# Debian packages beyond the venv: PL/Python 3 for PostgreSQL 15 (`cnnsql db functions`), chromium (the
# report's browser test), PgBouncer (`cnnsql db pooler`).
plpython:
	@bash scripts/system-deps.sh plpython

chromium:
	@bash scripts/system-deps.sh chromium

pgbouncer:
	@bash scripts/system-deps.sh pgbouncer

# The whole suite (unit and integration, real PostgreSQL, EvaDB, Velox, Ray).
test: setup chromium pgbouncer
	$(BIN)/python -m pytest -q tests

# The inner loop: unit tests only (no database, no servers), under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" tests

# The tests whose path depends on which data is loaded (real CIFAR-10 or synthetic): loading, reloading,
# bad archives, integrity under reloads, datasets. tests/newcomer.sh runs them on the newcomer's data.
test-data: setup
	$(BIN)/python -m pytest -q tests/test_foundation.py tests/test_bad_input.py tests/test_integrity.py tests/test_datasets.py

# EvaDB's own test suite (v0.3.9, from ../shared/peer), stock and with cnnsql's patch: fails if the patch
# breaks a test that passes on stock EvaDB. Its extra test packages go into the venv without their deps.
PEER ?= ../shared/peer/evadb-0.3.9
peer-evadb: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps mock==5.2.0 eva-decord==0.6.1 opencv-python-headless==5.1.0.95
	PEER_PYTHON=$(abspath $(BIN))/python PEER_PATCH=cnnsql.placements.evadb_patch:install bash $(PEER)/run.sh

# The container set-up (docker/): the app and PostgreSQL 15 images built, `cnnsql bench` on a reduced
# setting in the app container against the PostgreSQL container (private network, data read-only, the
# session JSON in docker/results), then everything removed. docker compose where a Docker engine runs,
# else podman (as root, installed with apt-get). CIFAR_ARCHIVE=PATH mounts CIFAR-10; without it, synthetic.
docker-bench:
	bash scripts/docker-bench.sh

# The same, checked (CI): fails unless the table printed, runs were logged in the container's PostgreSQL,
# the session JSON reached the host and nothing was left behind.
docker-test:
	RESULTS_DIR=$$(mktemp -d /tmp/cnnsql-docker-XXXXXX) bash scripts/docker-bench.sh

bench-sql: setup
	$(BIN)/cnnsql bench $(BENCH_ARGS)

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
