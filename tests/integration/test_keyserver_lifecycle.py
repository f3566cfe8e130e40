"""The whole story through the CLI against a real key server process (key server issue).

Start the server, add principals, derive a key, register, verify a fine-tuned copy (match)
and an independent model (no match), check receipt and verdict offline, restart, and audit.
Then search the data dir's raw bytes for every secret.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from freemark.scheme.bundle import load_bundle
from ttp_fixtures import (
    ModelFiles,
    ServerProcess,
    build_models,
    cli_env,
    json_out,
    run_cli,
    secret_fragments,
)

CLIENT = "freemark.cli"
SERVER = "freemark_keyserver.cli"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return build_models(tmp_path_factory.mktemp("models"))


def test_full_lifecycle_through_the_cli(files: ModelFiles, tmp_path: Path) -> None:
    data_dir = tmp_path / "ttp"
    server = ServerProcess(data_dir).start()
    try:
        tokens = {}
        for name, role in (("alice", "owner"), ("judge", "arbiter")):
            added = json_out(run_cli(SERVER, "principal", "add", "--data-dir", str(data_dir),
                                     "--name", name, "--role", role, "--json"))
            assert added["name"] == name and added["role"] == role
            tokens[name] = str(added["token"])
        alice = cli_env(FREEMARK_SERVER=server.address, FREEMARK_TOKEN=tokens["alice"])
        judge = cli_env(FREEMARK_SERVER=server.address, FREEMARK_TOKEN=tokens["judge"])

        key = tmp_path / "alice.fmk"
        keygen = json_out(run_cli(CLIENT, "keygen", "--model", str(files.host), "--layer", "act",
                                  "--triggers", str(files.triggers), "--owner", "alice",
                                  "--out", str(key), "--json"))
        assert keygen["host_ber"] == 0.0 and (key.stat().st_mode & 0o777) == 0o600

        receipt = json_out(run_cli(CLIENT, "register", "--key", str(key), "--model",
                                   str(files.host), "--json", env=alice))
        for field in ("registration_id", "log_index", "integrated_time", "signature"):
            assert field in receipt
        registration = str(receipt["registration_id"])
        receipt_file = tmp_path / "receipt.json"
        receipt_file.write_text(json.dumps(receipt))

        stolen = json_out(run_cli(CLIENT, "verify", "--registration", registration, "--model",
                                  str(files.finetuned), "--json", env=judge))
        innocent = json_out(run_cli(CLIENT, "verify", "--registration", registration, "--model",
                                    str(files.independent), "--json", env=judge))
        for verdict in (stolen, innocent):  # an arbiter gets coarse verdicts by default
            assert verdict["kind"] == "freemark/v1/coarse-verdict"
            for field in ("registration_id", "n_bits", "p_value", "p_value_above", "alpha",
                          "is_match", "outcome", "suspect_sha256", "suspect_size", "policy",
                          "requested_by", "log_index", "signature"):
                assert field in verdict
            assert not {"matches", "ber", "p_value_binomial", "tests"} & set(verdict)
        assert stolen["is_match"] is True and float(stolen["p_value"]) <= 1e-9
        assert innocent["is_match"] is False and float(innocent["p_value"]) >= 1e-3
        verdict_file = tmp_path / "verdict.json"
        verdict_file.write_text(json.dumps(stolen))

        pem = tmp_path / "ttp.pem"
        run_cli(CLIENT, "public-key", "--out", str(pem), env=alice)
        for statement in (receipt_file, verdict_file):
            ok = run_cli(CLIENT, "receipt", "verify", str(statement), "--public-key", str(pem))
            assert ok.stdout.startswith("OK")
        forged = dict(stolen, is_match=False)
        (tmp_path / "forged.json").write_text(json.dumps(forged))
        bad = run_cli(CLIENT, "receipt", "verify", str(tmp_path / "forged.json"),
                      "--public-key", str(pem), check=False)
        assert bad.returncode != 0
    finally:
        log_text = server.stop()

    server = ServerProcess(data_dir).start()
    try:
        shown = json_out(run_cli(CLIENT, "registrations", "show", registration, "--json",
                                 env=cli_env(FREEMARK_SERVER=server.address,
                                             FREEMARK_TOKEN=tokens["alice"])))
        assert shown["registration_id"] == registration
        again = json_out(run_cli(CLIENT, "verify", "--registration", registration, "--model",
                                 str(files.finetuned), "--json",
                                 env=cli_env(FREEMARK_SERVER=server.address,
                                             FREEMARK_TOKEN=tokens["judge"])))
        assert again["is_match"] is True and int(again["log_index"]) == 3
    finally:
        log_text += server.stop()
    audit = json_out(run_cli(SERVER, "audit", "--data-dir", str(data_dir), "--json"))
    assert audit["ok"] is True and audit["entries"] == 4 and audit["registrations"] == 1

    bundle = load_bundle(key)
    secrets = (secret_fragments(bundle.key) + secret_fragments(bundle.triggers.inputs)
               + [np.packbits(bundle.bits).tobytes(), bundle.nonce]
               + [t.encode() for t in tokens.values()])
    for path in data_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            for secret in secrets:
                assert secret not in raw, f"a secret is readable in {path.name}"
    for secret in [t for t in tokens.values()] + [bundle.nonce.hex()]:
        assert secret not in log_text
