"""Running untrusted models: the parent side (`runner`, `pool`), what both sides share
(`limits`, `protocol`, `errors`) and the child side (`forkserver`, `worker`, `isolation`).

This file imports nothing, so the fork server, started as `python -m
freemark_keyserver.sandbox.forkserver`, loads no parent code. The child side never imports the
parent side; nothing outside this package imports the pool, the worker, the fork server or the
isolation layers (import-linter contracts in pyproject.toml).
"""
