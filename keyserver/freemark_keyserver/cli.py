"""The `freemark-keyserver` command: serve, manage principals and reference panels, audit the
log, rotate keys."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from freemark.cli.display import print_fields, print_json, print_rows
from freemark.records.types import DISCLOSURES, VerdictPolicy
from freemark.tlog import merkle
from freemark_keyserver import config as cfg
from freemark_keyserver import logs
from freemark_keyserver.auth import ADMIN, ARBITER, OWNER, hash_token, new_token
from freemark_keyserver.claims import claim_record_id
from freemark_keyserver.config import Rate
from freemark_keyserver.crypto import Envelope, rewrap, save_keyring
from freemark_keyserver.errors import ServiceError
from freemark_keyserver.handlers import panels
from freemark_keyserver.handlers.context import Context
from freemark_keyserver.handlers.hosts import rewrap_host, rewrap_member
from freemark_keyserver.sandbox.limits import GiB, SandboxLimits
from freemark_keyserver.server import serve
from freemark_keyserver.store import (
    DuplicateError,
    PanelMember,
    Principal,
    StoreError,
    open_store,
)
from freemark_keyserver.tlog.audit import audit


def _config(args: argparse.Namespace) -> cfg.ServerConfig:
    options = {
        "data_dir": Path(args.data_dir), "db": args.db,
        "master_key_file": Path(args.master_key_file) if args.master_key_file else None,
        "signing_key_file": Path(args.signing_key_file) if args.signing_key_file else None,
        "origin": args.origin,
    }
    if getattr(args, "command", "") == "serve":
        options.update(
            listen=args.listen, insecure=args.insecure,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            client_ca=Path(args.client_ca) if args.client_ca else None,
            max_upload_bytes=(cfg.upload_cap(args.max_parameters) if args.max_upload_bytes is None
                              else args.max_upload_bytes),
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_references=args.max_references, grace_seconds=args.grace,
            max_scan_candidates=args.max_scan_candidates,
            claim_candidates=args.claim_candidates,
            sandbox_workers=args.sandbox_workers, sandbox_queue=args.sandbox_queue,
            sandbox=SandboxLimits(max_parameters=args.max_parameters,
                                  max_memory_bytes=int(args.sandbox_max_memory * GiB)
                                  ).with_cpu_seconds(args.sandbox_cpu_seconds),
            max_bundle_bytes=args.max_bundle_bytes,
            max_calls_per_principal=args.max_calls_per_principal,
            stream_idle_timeout=args.stream_idle_timeout, min_upload_rate=args.min_upload_rate,
            upload_rate_grace=args.upload_rate_grace, principal_recheck=args.principal_recheck,
            spool_quota_bytes=args.spool_quota_bytes,
            spool_principal_share=args.spool_principal_share,
            spool_memory_bytes=args.spool_memory_bytes,
            model_root=args.model_root,
            max_stream_seconds=args.max_stream_seconds,
            exempt_stream_lifetime=args.exempt_stream_lifetime,
            register_rate_principal=args.register_rate_principal,
            verify_rate_principal=args.verify_rate_principal,
            verify_rate_registration=args.verify_rate_registration,
            metrics_listen=args.metrics_listen,
            endpoint_allow=tuple(args.endpoint_allow),
            endpoint_read_timeout_s=args.endpoint_read_timeout,
            endpoint_total_timeout_s=args.endpoint_total_timeout,
            verdict_policy=VerdictPolicy.make(alpha_min=args.alpha_min, alpha_max=args.alpha_max,
                                              arbiter_disclosure=args.arbiter_disclosure),
            panel_reach=args.panel_reach,
        )
    return cfg.ServerConfig(**options)


def _serve(args: argparse.Namespace) -> int:
    logs.configure(args.log_format)
    config = _config(args)
    policy = config.verdict_policy
    logging.getLogger("freemark_keyserver").info(
        "verdict policy %s: %s, %s verdicts for arbiters", policy.id, policy.describe(),
        policy.arbiter_disclosure)
    serve(config)
    return 0


def _principal_add(args: argparse.Namespace) -> int:
    config = _config(args)
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_store(config.database)
    try:
        token = new_token()
        store.add_principal(Principal(args.name, args.role, hash_token(token),
                                      time.time_ns() // 1000))
    finally:
        store.close()
    payload = {"name": args.name, "role": args.role, "token": token}
    if args.json:
        print_json(payload)
    else:
        print_fields("principal added (the token is shown once: store it now)", payload)
    return 0


def _principal_list(args: argparse.Namespace) -> int:
    store = open_store(_config(args).database)
    try:
        principals = store.list_principals()
    finally:
        store.close()
    rows = [{"name": p.name, "role": p.role, "disabled": p.disabled} for p in principals]
    if args.json:
        print_json({"principals": rows})
    else:
        print_rows(["name", "role", "disabled"], [list(r.values()) for r in rows])
    return 0


def _principal_disable(args: argparse.Namespace) -> int:
    store = open_store(_config(args).database)
    try:
        store.disable_principal(args.name)
    finally:
        store.close()
    print_json({"name": args.name, "disabled": True}) if args.json else print(f"disabled {args.name}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    config = _config(args)
    store = open_store(config.database)
    try:
        counts = audit(store, cfg.load_signing_key(config).verifier(), config.origin)
    except merkle.LogProofError as exc:
        print(f"freemark-keyserver: audit FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print_json({"ok": True, **counts}) if args.json else print_fields("audit OK", counts)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    config = _config(args)
    path = cfg.keyring_path(config)
    if path is None:
        # The re-wrapped records would need a key that exists nowhere but in this process.
        raise ValueError(f"the master keyring comes from {cfg.MASTER_KEY_ENV}; rotation must save "
                         "the new keyring before re-wrapping anything: unset it and pass "
                         "--master-key-file with the same keyring, then hand every replica the "
                         "rotated file")
    keyring = cfg.load_keyring(config).generate_new_version()
    # Saved first (it keeps every old version): a crash part-way leaves records wrapped under
    # old or new versions, all of them in the saved keyring, never under a key that was lost.
    save_keyring(path, keyring)
    store = open_store(config.database)
    counts = {"registrations": 0, "claim_signatures": 0, "panel_members": 0}
    try:
        for record in store.registrations_for_rewrap():
            envelope = rewrap(keyring, Envelope.from_bytes(record.envelope),
                              record_id=record.registration_id, owner=record.owner)
            # The host's segments stay as they are: only its header's data key is re-wrapped.
            store.update_envelopes(record.registration_id, keyring.current_version,
                                   envelope.to_bytes(), rewrap_host(keyring, record))
            counts["registrations"] += 1
        for claim in store.claim_signatures():
            envelope = rewrap(keyring, Envelope.from_bytes(claim.envelope),
                              record_id=claim_record_id(claim.registration_id), owner=claim.owner)
            store.update_claim_envelope(claim.registration_id, keyring.current_version,
                                        envelope.to_bytes())
            counts["claim_signatures"] += 1
        for member in store.panel_members(active=False):
            store.update_panel_envelope(member.member_id, keyring.current_version,
                                        rewrap_member(keyring, member))
            counts["panel_members"] += 1
    finally:
        store.close()
    payload = {"key_version": keyring.current_version, "rewrapped": counts, "keyring": str(path)}
    if args.json:
        print_json(payload)
    else:
        print_fields("master key rotated", {
            **payload, "rewrapped": ", ".join(f"{n} {kind}" for kind, n in counts.items())})
    return 0


def _context(config: cfg.ServerConfig) -> Context:
    pool = config.start_sandbox()  # before the keys, as the server does
    try:
        return Context(config=config, store=open_store(config.database),
                       keyring=cfg.load_keyring(config), signer=cfg.load_signing_key(config),
                       pool=pool)
    except BaseException:
        pool.close()
        raise


def _member_row(member: PanelMember) -> dict[str, object]:
    return {"member_id": member.member_id, "label": member.label,
            "family": member.family.hex()[:16], "fingerprint": member.fingerprint.hex(),
            "added_at": member.added_at, "removed_at": member.removed_at}


def _panel_add(args: argparse.Namespace) -> int:
    ctx = _context(_config(args))
    try:
        member = panels.add_panel_member(ctx, Path(args.model), like=args.like,
                                         label=args.label or "", now=time.time_ns() // 1000)
    finally:
        ctx.close()
    row = _member_row(member)
    print_json(row) if args.json else print_fields("panel member added (joins later "
                                                   "registrations of this family)", row)
    return 0


def _panel_list(args: argparse.Namespace) -> int:
    store = open_store(_config(args).database)
    try:
        rows = [_member_row(m) for m in store.panel_members(active=not args.all)]
    finally:
        store.close()
    if args.json:
        print_json({"members": rows})
    else:
        print_rows(["member_id", "label", "family", "added_at", "removed_at"],
                   [[r[k] for k in ("member_id", "label", "family", "added_at", "removed_at")]
                    for r in rows])
    return 0


def _panel_remove(args: argparse.Namespace) -> int:
    store = open_store(_config(args).database)
    try:
        removed = store.remove_panel_member(args.member, time.time_ns() // 1000)
    finally:
        store.close()
    if not removed:
        raise ValueError(f"no active panel member {args.member!r}")
    print_json({"removed": args.member}) if args.json else print(f"removed {args.member} "
                                                                 "(earlier receipts still name it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freemark-keyserver", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default="freemark-data", help="keys, SQLite file, spool")
    common.add_argument("--db", help="SQLite path or postgresql:// URL (default: DATA_DIR's SQLite)")
    common.add_argument("--master-key-file", help=f"keyring file (or env {cfg.MASTER_KEY_ENV})")
    common.add_argument("--signing-key-file", help=f"Ed25519 PEM (or env {cfg.SIGNING_KEY_ENV})")
    common.add_argument("--origin", default=cfg.DEFAULT_ORIGIN,
                        help="the log's name, first line of every checkpoint; set it once per "
                             "log, a schema-less URL such as ttp.example.com/log (default "
                             "%(default)s)")
    common.add_argument("--json", action="store_true", help="one JSON object on stdout")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the key server")
    p.add_argument("--listen", default=cfg.DEFAULT_LISTEN)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--client-ca", help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS")
    p.add_argument("--max-upload-bytes", type=int, metavar="N",
                   help="bytes one uploaded model may hold (default: the 16-bit weights of "
                   "--max-parameters parameters plus a header, rounded up to GiB: "
                   f"{cfg.DEFAULT_MAX_UPLOAD // GiB} GiB for the default)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=cfg.DEFAULT_MAX_CONCURRENT_RPCS,
                   help="KeyService calls at once, all principals (health and reflection are "
                        "outside this cap); beyond it RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-calls-per-principal", type=int,
                   default=cfg.DEFAULT_MAX_CALLS_PER_PRINCIPAL,
                   help="calls one principal may have open at once (default %(default)s)")
    p.add_argument("--max-bundle-bytes", type=int, default=cfg.DEFAULT_MAX_BUNDLE,
                   help="largest key bundle (and so largest gRPC message) accepted "
                        "(default %(default)s)")
    p.add_argument("--stream-idle-timeout", type=float, default=cfg.DEFAULT_STREAM_IDLE_TIMEOUT,
                   help="seconds an upload stream may send nothing before it is closed "
                        "(default %(default)s)")
    p.add_argument("--min-upload-rate", type=int, default=cfg.DEFAULT_MIN_UPLOAD_RATE,
                   help="bytes/s an upload must average after --upload-rate-grace "
                        "(default %(default)s)")
    p.add_argument("--upload-rate-grace", type=float, default=cfg.DEFAULT_UPLOAD_RATE_GRACE,
                   help="seconds before --min-upload-rate applies (default %(default)s)")
    p.add_argument("--principal-recheck", type=float, default=cfg.DEFAULT_PRINCIPAL_RECHECK,
                   help="seconds between re-reads of the principals holding open calls; a "
                        "disabled one's calls are ended (default %(default)s)")
    p.add_argument("--spool-quota-bytes", type=int, default=cfg.DEFAULT_SPOOL_QUOTA,
                   help="bytes all open uploads may hold in the spool together, reserved as "
                        "they arrive (default %(default)s)")
    p.add_argument("--spool-principal-share", type=float,
                   default=cfg.DEFAULT_SPOOL_PRINCIPAL_SHARE, metavar="FRACTION",
                   help="the part of --spool-quota-bytes one principal's open uploads may hold "
                        "together, in (0, 1] (default %(default)s)")
    p.add_argument("--spool-memory-bytes", type=int, default=cfg.DEFAULT_SPOOL_MEMORY,
                   help="announced bytes of open uploads streamed into sealed memory files; "
                        "an upload that does not fit what is left goes to the disk spool, "
                        "encrypted under a key that lives for the call only, and is decrypted "
                        "into memory once it has arrived (plaintext models never on disk); 0: "
                        "always the encrypted spool (default %(default)s)")
    p.add_argument("--model-root", type=Path, default=None, metavar="DIR",
                   help="a directory of public models (a hub's read-only mirror) that Register "
                        "and Verify may name by relative path instead of uploading them; "
                        "symbolic links are never followed (default: none, uploads only)")
    p.add_argument("--max-stream-seconds", type=float, default=cfg.DEFAULT_MAX_STREAM_SECONDS,
                   help="seconds an upload stream may last, however fast it still sends; then "
                        "it is closed and its spool bytes freed (default %(default)s)")
    p.add_argument("--exempt-stream-lifetime", type=float,
                   default=cfg.DEFAULT_EXEMPT_STREAM_LIFETIME,
                   help="seconds a health Watch or reflection stream may last before it is "
                        "cancelled (clients re-watch) (default %(default)s)")
    p.add_argument("--verify-rate-principal", type=Rate.parse,
                   default=cfg.DEFAULT_VERIFY_RATE_PRINCIPAL, metavar="N/UNIT",
                   help="Verify token bucket per caller, e.g. 10/min; 'off' (default %(default)s)")
    p.add_argument("--verify-rate-registration", type=Rate.parse,
                   default=cfg.DEFAULT_VERIFY_RATE_REGISTRATION, metavar="N/UNIT",
                   help="Verify token buckets per registration: its owner's, and one for all "
                        "other callers together; charged once the upload is complete "
                        "(default %(default)s)")
    p.add_argument("--register-rate-principal", type=Rate.parse,
                   default=cfg.DEFAULT_REGISTER_RATE_PRINCIPAL, metavar="N/UNIT",
                   help="Register token bucket per caller; 'off' (default %(default)s)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    p.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="server log lines on stderr (default %(default)s)")
    p.add_argument("--max-references", type=int, default=cfg.DEFAULT_MAX_REFERENCES,
                   help="reference models an owner may attach to one registration")
    p.add_argument("--max-scan-candidates", type=int, default=cfg.DEFAULT_MAX_SCAN_CANDIDATES,
                   metavar="N", help="candidate tensors one Verify of an ONNX suspect may "
                   "judge (default %(default)s); past it the call is refused")
    p.add_argument("--claim-candidates", type=int, default=cfg.DEFAULT_CLAIM_CANDIDATES,
                   metavar="N", help="earlier registrations of the upload's input kind that "
                   "get Register's full prior-claim check: the N the claim index ranks "
                   "nearest, besides any it cannot rank (default %(default)s)")
    p.add_argument("--sandbox-workers", type=int, metavar="N",
                   help="untrusted models run at once (default: min(cores, available memory / "
                        "(the 4 GiB per-run limit + 3 x the 512 MiB reply cap)))")
    p.add_argument("--max-parameters", type=int, default=SandboxLimits.max_parameters,
                   metavar="N", help="the parameter count a checkpoint's config may imply "
                   "(default %(default)s); larger uploads are refused before anything is built")
    p.add_argument("--sandbox-max-memory", type=float, default=SandboxLimits.max_memory_bytes / GiB,
                   metavar="GIB", help="ceiling of one sandbox run's address space, in GiB "
                   f"(default %(default)g); a run gets {SandboxLimits.memory_bytes / GiB:g} GiB + "
                   f"{SandboxLimits.memory_per_model_byte:g} x its model files' size, up to this")
    p.add_argument("--sandbox-cpu-seconds", type=int, default=SandboxLimits.cpu_seconds,
                   metavar="S", help="CPU seconds one sandbox run may use (RLIMIT_CPU; default "
                   "%(default)s); its wall-clock deadline keeps the same ratio to it "
                   f"({SandboxLimits.wall_seconds / SandboxLimits.cpu_seconds:g} x). Raise it "
                   "for billion-parameter checkpoints registered with probes or a panel")
    p.add_argument("--sandbox-queue", type=int, metavar="N",
                   help="runs that may wait for a worker (default: 4 x workers); beyond, "
                        "RESOURCE_EXHAUSTED (SANDBOX_BUSY) with a retry hint")
    p.add_argument("--grace", type=float, default=cfg.DEFAULT_GRACE_SECONDS,
                   help="seconds in-flight calls get after SIGTERM")
    p.add_argument("--alpha-min", type=float, default=cfg.DEFAULT_ALPHA_MIN,
                   help="the strictest alpha the server signs verdicts for (default %(default)g)")
    p.add_argument("--alpha-max", type=float, default=cfg.DEFAULT_ALPHA_MAX,
                   help="the laxest alpha the server signs verdicts for (default %(default)g)")
    p.add_argument("--arbiter-disclosure", choices=DISCLOSURES, default=cfg.DEFAULT_ARBITER_DISCLOSURE,
                   help="what requesters other than the registration's owner are told: every "
                        "statistic, or the outcome and a p-value bucket (default %(default)s)")
    p.add_argument("--endpoint-allow", action="append", default=[], metavar="CIDR_OR_HOST",
                   help="a host name, address or CIDR network VerifyEndpoint may query "
                        "(repeatable; none by default: every endpoint is refused; loopback "
                        "and private addresses only when an address or network names them)")
    p.add_argument("--endpoint-read-timeout", type=float,
                   default=cfg.ServerConfig.endpoint_read_timeout_s, metavar="SECONDS",
                   help="VerifyEndpoint: the longest wait for any one read from an endpoint "
                        "(default %(default)s)")
    p.add_argument("--endpoint-total-timeout", type=float,
                   default=cfg.ServerConfig.endpoint_total_timeout_s, metavar="SECONDS",
                   help="VerifyEndpoint: the longest a whole conversation with an endpoint may "
                        "take (default %(default)s)")
    p.add_argument("--panel-reach", choices=cfg.PANEL_REACH_MODES, default=cfg.DEFAULT_PANEL_REACH,
                   help="a Register whose reference panel cannot give a relabelled copy of the "
                        "host a match at the default alpha: refused (PANEL_TOO_WEAK), or "
                        "registered with a warning signed into the receipt (default %(default)s)")
    p.set_defaults(handler=_serve)

    principal = sub.add_parser("principal", help="manage principals").add_subparsers(
        dest="action", required=True)
    p = principal.add_parser("add", parents=[common], help="add a principal; prints its token once")
    p.add_argument("--name", required=True)
    p.add_argument("--role", required=True, choices=[OWNER, ARBITER, ADMIN])
    p.set_defaults(handler=_principal_add)
    p = principal.add_parser("list", parents=[common])
    p.set_defaults(handler=_principal_list)
    p = principal.add_parser("disable", parents=[common])
    p.add_argument("--name", required=True)
    p.set_defaults(handler=_principal_disable)

    panel = sub.add_parser(
        "panel", help="the operator's reference panels: independent models per architecture "
                      "family, added to every later registration of that family").add_subparsers(
        dest="action", required=True)
    p = panel.add_parser("add", parents=[common], help="vet, read and store a reference model")
    p.add_argument("--model", required=True, help="the reference, a .pt2 program (untrusted: it "
                                                   "is vetted and run in the sandbox)")
    p.add_argument("--like", required=True, metavar="REGISTRATION_ID",
                   help="a registration of the same architecture; its key reads the model")
    p.add_argument("--label", help="a name for listings (default: the file name)")
    p.set_defaults(handler=_panel_add)
    p = panel.add_parser("list", parents=[common])
    p.add_argument("--all", action="store_true", help="include removed members")
    p.set_defaults(handler=_panel_list)
    p = panel.add_parser("remove", parents=[common])
    p.add_argument("member", help="member id (pan_...)")
    p.set_defaults(handler=_panel_remove)

    p = sub.add_parser("audit", parents=[common], help="re-check the whole log")
    p.set_defaults(handler=_audit)
    p = sub.add_parser("rotate-master-key", parents=[common],
                       help="add a master key version and re-wrap every data key under it")
    p.set_defaults(handler=_rotate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `freemark-keyserver`."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except DuplicateError as exc:
        print(f"freemark-keyserver: error: already exists: {exc}", file=sys.stderr)
    except ServiceError as exc:
        print(f"freemark-keyserver: error: {exc.code.name}: {exc}", file=sys.stderr)
    except (StoreError, ValueError, OSError) as exc:
        print(f"freemark-keyserver: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
