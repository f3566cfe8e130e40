# freemark: one target per job. `make setup` first on a fresh machine.
#   make demo   the whole story end to end (TTP on embedded defaults, keygen, register, disputes)
#   make test   the test suite (a real gRPC server, SQLite and PostgreSQL, real models)
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
export PYTHONPATH := client:keyserver

.PHONY: setup postgres proto proto-check lint test demo bench

setup:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# CPU wheel on local disk; must come first so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

# Debian's PostgreSQL server binaries for the tests (no cluster is started; tests start their own).
postgres:
	bash scripts/pg-setup.sh

proto:
	$(PY) -m grpc_tools.protoc -I proto \
		--python_out=client --grpc_python_out=client \
		--mypy_out=client --mypy_grpc_out=client \
		--plugin=protoc-gen-mypy=.venv/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=.venv/bin/protoc-gen-mypy_grpc \
		proto/freemark/v1/*.proto

proto-check: proto
	@test -z "$$(git status --porcelain client/freemark/v1)" || \
		(git status --porcelain client/freemark/v1; echo "generated code drifted from proto/: run make proto and commit"; exit 1)

lint:
	.venv/bin/ruff check client keyserver tests bench examples
	.venv/bin/mypy client/freemark keyserver/freemark_keyserver

test: postgres
	$(PY) -m pytest -q

demo:
	$(PY) examples/demo.py

bench: postgres
	mkdir -p out
	$(PY) bench/scheme.py --json out/bench_scheme.json
	$(PY) bench/robustness.py --out out/robustness
	PYTHONPATH=client:keyserver:tests $(PY) bench/keyserver.py --json out/bench_keyserver.json
