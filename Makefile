# freemark: one target per job. `make setup` first on a fresh machine.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
export PYTHONPATH := client:keyserver

.PHONY: setup proto proto-check lint test demo bench

setup:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# CPU wheel on local disk; must come first so nothing pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

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
	.venv/bin/ruff check client keyserver tests bench
	.venv/bin/mypy client/freemark keyserver/freemark_keyserver

test:
	$(PY) -m pytest -q

demo:
	$(PY) -m freemark.demo

bench:
	$(PY) bench/scheme.py --json out/bench_scheme.json
