"""Server settings and where the secrets come from (embedded defaults in the data dir).

Master keyring: `FREEMARK_MASTER_KEY` ("1:<base64>,2:<base64>"), else `--master-key-file`,
else DATA_DIR/master.key created on first start (0600). Signing key: `FREEMARK_SIGNING_KEY`
(PEM text), else `--signing-key-file`, else DATA_DIR/signing.pem created on first start.
Replicas on one PostgreSQL share both, given as files or environment variables.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from freemark.endpoint import EndpointPolicy
from freemark.formats.huggingface import MAX_HEADER_BYTES, MAX_PARAMETERS
from freemark.records.types import VerdictPolicy
from freemark.tlog.note import check_key_name
from freemark_keyserver.crypto import (
    MasterKeyring,
    SigningKey,
    keyring_from_env,
    keyring_from_file,
    load_or_create_keyring,
    load_or_create_signing_key,
    signing_key_from_pem,
)
from freemark_keyserver.sandbox.limits import SandboxLimits
from freemark_keyserver.sandbox.runner import SandboxPool, start_pool

EXEMPT_STREAMS = 8   # health Watch and reflection streams open at once
EXEMPT_STREAMS_PER_PEER = 2  # of them, from one peer address (an IPv6 /64): `rpc.calls`
SPARE_THREADS = 8    # pool threads beyond every cap: health checks and quick refusals
UNITS = {"s": 1.0, "min": 60.0, "hour": 3600.0, "day": 86400.0}


@dataclass(frozen=True)
class Rate:
    """`burst` calls at once, refilled at `burst` per `period` seconds (burst 0: no limit)."""

    burst: int
    period: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'10/min' -> Rate(10, 60); '0' or 'off' -> no limit. ValueError names the syntax."""
        if text.strip().lower() in ("0", "off"):
            return cls(0, 1.0)
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(s|min|hour|day)\s*", text)
        if match is None or int(match.group(1)) == 0:
            raise ValueError(f"rate {text!r}: write N/UNIT with UNIT in {', '.join(UNITS)} "
                             "(e.g. 10/min), or 'off'")
        return cls(int(match.group(1)), UNITS[match.group(2)])

    def __str__(self) -> str:
        if not self.burst:
            return "off"
        unit = next(name for name, seconds in UNITS.items() if seconds == self.period)
        return f"{self.burst}/{unit}"


UNLIMITED = Rate(0, 1.0)  # what `--verify-rate-... off` gives: benchmarks and load tests


@dataclass(frozen=True)
class CallLimits:
    """The server's call discipline (flags of `serve`, defaults in `config`)."""

    max_calls: int
    max_calls_per_principal: int
    idle_timeout: float
    min_upload_rate: int  # bytes per second, averaged from the start of the stream
    rate_grace: float     # seconds before the minimum rate applies
    principal_recheck: float
    max_stream_seconds: float = 3600.0  # a request stream is ended past this
    exempt_lifetime: float = 600.0  # a health Watch / reflection stream is ended past this

    @property
    def pool_threads(self) -> int:
        """Threads the gRPC server needs so the caps, not the pool, decide who waits."""
        return self.max_calls + EXEMPT_STREAMS + SPARE_THREADS


MASTER_KEY_ENV = "FREEMARK_MASTER_KEY"
SIGNING_KEY_ENV = "FREEMARK_SIGNING_KEY"
DEFAULT_LISTEN = "127.0.0.1:50051"


def upload_cap(max_parameters: int) -> int:
    """The default upload cap for a parameter cap: the 16-bit (bf16/fp16, as open-weights
    decoders ship) weights of the largest checkpoint it admits, 2 bytes a parameter, plus a
    safetensors header, rounded up to whole GiB. 4 GiB for the default 2 B parameters: the
    former fixed 2 GiB refused a 1.1 B bf16 decoder (2.2 GB packed) that the parameter cap
    admitted. `serve --max-upload-bytes` overrides it (float32 checkpoints need twice as much)."""
    return math.ceil((2 * max_parameters + MAX_HEADER_BYTES) / 1024**3) * 1024**3


DEFAULT_MAX_UPLOAD = upload_cap(MAX_PARAMETERS)

# A real ImageNet key (EfficientNet-Lite0, 16 triggers at 224x224, 1280 units, 1024 probes)
# is 16.2 MB; the digits CNN's 0.68 MB. 32 MiB leaves room for twice the triggers, and is
# also the largest message the server accepts (the bundle rides in Register's header).
DEFAULT_MAX_BUNDLE = 32 * 1024**2
DEFAULT_GRACE_SECONDS = 30.0
DEFAULT_MAX_CONCURRENT_RPCS = 64
# Stream discipline (docs/operations.md says why each default is what it is).
DEFAULT_MAX_CALLS_PER_PRINCIPAL = 8
DEFAULT_STREAM_IDLE_TIMEOUT = 30.0
DEFAULT_MIN_UPLOAD_RATE = 64 * 1024  # bytes/s: a 512 kbit/s link still uploads
DEFAULT_UPLOAD_RATE_GRACE = 10.0
DEFAULT_PRINCIPAL_RECHECK = 2.0
DEFAULT_SPOOL_QUOTA = 4 * DEFAULT_MAX_UPLOAD
DEFAULT_SPOOL_PRINCIPAL_SHARE = 0.5  # of the quota, one principal's open uploads together
# Announced bytes of open uploads streamed into sealed memory files rather than the encrypted
# disk spool: one upload at the default cap (a 1.1 B bf16 decoder is 2.2 GB). 0 sends every
# upload to the encrypted disk spool.
DEFAULT_SPOOL_MEMORY = DEFAULT_MAX_UPLOAD
DEFAULT_MAX_STREAM_SECONDS = 3600.0  # one request stream, however fast it still sends
DEFAULT_EXEMPT_STREAM_LIFETIME = 600.0  # a health Watch or reflection stream; clients re-watch
DEFAULT_REGISTER_RATE_PRINCIPAL = Rate(20, 3600.0)  # 20/hour
DEFAULT_VERIFY_RATE_PRINCIPAL = Rate(10, 60.0)  # 10/min
DEFAULT_VERIFY_RATE_REGISTRATION = Rate(20, 3600.0)  # 20/hour
DEFAULT_MAX_REFERENCES = 16
# Candidate tensors one Verify of a scanned suspect (an ONNX graph) may judge; past it the
# call is refused (SANDBOX_LIMIT), never judged on fewer. Each costs one judgement (1,000
# permutations, and the aligned test where a panel allows it).
DEFAULT_MAX_SCAN_CANDIDATES = 512
# Earlier registrations that get Register's full prior-claim check (besides those the claim
# index cannot rank): the nearest by claim signature over every tensor of the upload
# (`freemark_keyserver.claims`). Their scans share one forward pass in the sandbox, but
# each is still judged tensor by tensor (1,000 permutations each), so this bounds a
# Register's cost whatever the registry's size: with 2, a Register against 10,000 costs
# less than twice one against a single registration, whatever the machine's load (with 4
# it did not when the load was low: docs/operations.md). On the labelled set of
# bench/registry.py every copy's source ranked first among 10,000 same-family neighbours
# in every run (docs/keyserver.md): the second is margin. An operator whose hub holds many
# fine-tunes of one base model close together raises it (`--claim-candidates`).
DEFAULT_CLAIM_CANDIDATES = 2
DEFAULT_ORIGIN = "freemark-ttp"
# The verdict policy (signed into every verdict). Alpha at most 1e-6: a verdict at a laxer
# level is not evidence a court should act on (0.99 would sign `match` for an innocent model),
# and 1e-6 leaves room above the scheme default of 1e-9. At least 1e-12: a stricter level
# would only let someone obtain a signed `no_match` for a genuine copy whose evidence is
# strong by any standard; real copies reach far below it (p ~ 1e-25), so nothing is lost.
DEFAULT_ALPHA_MIN = 1e-12
DEFAULT_ALPHA_MAX = 1e-6
# What requesters other than the registration's owner see. Coarse by default: an arbiter needs
# the decision and its strength, and exact statistics (matches, BER, per-test p-values, the
# null's fit) are a gauge a thief with Verify access can steer a laundering attempt by. An
# operator who vets every arbiter may choose "full".
DEFAULT_ARBITER_DISCLOSURE = "coarse"
# What Register does with a reference panel that cannot give a relabelled copy of the host a
# match at the policy's default alpha (issue 18, item 7): refuse it (PANEL_TOO_WEAK), so the
# owner learns it while he can still add references, or register with a signed warning in the
# receipt, so an operator whose families have only weak panels never holds a registration up.
PANEL_REACH_MODES = ("refuse", "warn")
DEFAULT_PANEL_REACH = "refuse"


def default_policy(arbiter_disclosure: str = DEFAULT_ARBITER_DISCLOSURE) -> VerdictPolicy:
    """The verdict policy a server has unless its operator sets one (the default alpha
    range, and `arbiter_disclosure`)."""
    return VerdictPolicy.make(alpha_min=DEFAULT_ALPHA_MIN, alpha_max=DEFAULT_ALPHA_MAX,
                              arbiter_disclosure=arbiter_disclosure)


@dataclass(frozen=True)
class ServerConfig:
    """Everything `create_server` needs; built from the command line or by tests."""

    data_dir: Path
    db: str | None = None
    listen: str = DEFAULT_LISTEN
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    insecure: bool = False
    master_key_file: Path | None = None
    signing_key_file: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS  # KeyService calls, all principals
    max_calls_per_principal: int = DEFAULT_MAX_CALLS_PER_PRINCIPAL
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    min_upload_rate: int = DEFAULT_MIN_UPLOAD_RATE
    upload_rate_grace: float = DEFAULT_UPLOAD_RATE_GRACE
    principal_recheck: float = DEFAULT_PRINCIPAL_RECHECK
    spool_quota_bytes: int = DEFAULT_SPOOL_QUOTA
    spool_principal_share: float = DEFAULT_SPOOL_PRINCIPAL_SHARE
    spool_memory_bytes: int = DEFAULT_SPOOL_MEMORY  # `rpc.uploads`: memory or encrypted disk
    # Where models named by path are read (`rpc.modelroot`, `--model-root`: a hub's read-only
    # mirror of public models); None: every model is uploaded.
    model_root: Path | None = None
    max_stream_seconds: float = DEFAULT_MAX_STREAM_SECONDS
    exempt_stream_lifetime: float = DEFAULT_EXEMPT_STREAM_LIFETIME
    register_rate_principal: Rate = DEFAULT_REGISTER_RATE_PRINCIPAL
    verify_rate_principal: Rate = DEFAULT_VERIFY_RATE_PRINCIPAL
    verify_rate_registration: Rate = DEFAULT_VERIFY_RATE_REGISTRATION
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus page; None: no page
    max_references: int = DEFAULT_MAX_REFERENCES  # reference models per Register
    max_scan_candidates: int = DEFAULT_MAX_SCAN_CANDIDATES  # tensors per scanned Verify
    claim_candidates: int = DEFAULT_CLAIM_CANDIDATES  # full prior-claim checks per Register
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    # The log's C2SP origin: every checkpoint's first line and its note key name.
    origin: str = DEFAULT_ORIGIN
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    # Sandbox children running at once (None: `sandbox.pool.default_workers`) and runs that
    # may wait for one (None: 4 x workers); past both, SANDBOX_BUSY with a retry hint.
    sandbox_workers: int | None = None
    sandbox_queue: int | None = None
    verdict_policy: VerdictPolicy = field(default_factory=default_policy)
    # Where VerifyEndpoint may send queries (`--endpoint-allow`): host names, addresses and
    # CIDR networks; empty (the default) refuses every endpoint. The rest of the HTTP
    # client's limits are `EndpointPolicy`'s defaults (docs/blackbox.md), but for its read
    # and total deadlines (`--endpoint-read-timeout`, `--endpoint-total-timeout`): what a
    # slow endpoint may cost the key server is the operator's choice.
    endpoint_allow: tuple[str, ...] = ()
    endpoint_read_timeout_s: float = EndpointPolicy.read_timeout_s
    endpoint_total_timeout_s: float = EndpointPolicy.total_timeout_s
    panel_reach: str = DEFAULT_PANEL_REACH  # one of PANEL_REACH_MODES

    def __post_init__(self) -> None:
        check_key_name(self.origin)  # it names the note key, so the same rules apply
        if self.max_scan_candidates < 1:
            raise ValueError("a scanned Verify must be allowed at least one candidate tensor")
        if self.claim_candidates < 1:
            raise ValueError("Register's prior-claim check needs at least one candidate "
                             "(--claim-candidates): with none, the claim index would clear "
                             "every copy of a registered model")
        if self.panel_reach not in PANEL_REACH_MODES:
            raise ValueError(f"panel reach must be one of {', '.join(PANEL_REACH_MODES)}, not "
                             f"{self.panel_reach!r}")
        _ = self.endpoint_policy  # an allow-list entry that is not a name, address or network
        if self.model_root is not None and not self.model_root.is_dir():
            raise ValueError(f"the model root {self.model_root} is not a directory")
        if self.spool_memory_bytes < 0:
            raise ValueError("the spool's memory budget is a number of bytes >= 0, not "
                             f"{self.spool_memory_bytes}")
        if not 0.0 < self.spool_principal_share <= 1.0:
            raise ValueError(f"the spool share per principal is a fraction in (0, 1], not "
                             f"{self.spool_principal_share:g}")

    @property
    def database(self) -> str:
        """`--db` as given, else the embedded SQLite file in the data dir."""
        return self.db or str(self.data_dir / "freemark.sqlite3")

    def start_sandbox(self) -> SandboxPool:
        """Start the sandbox pool these settings describe (before any key is read)."""
        return start_pool(self.sandbox, workers=self.sandbox_workers, queue=self.sandbox_queue)

    @property
    def endpoint_policy(self) -> EndpointPolicy:
        """The HTTP client's rules for VerifyEndpoint: the operator's allow-list and
        deadlines, the library's caps and budgets."""
        return EndpointPolicy(allow=self.endpoint_allow,
                              read_timeout_s=self.endpoint_read_timeout_s,
                              total_timeout_s=self.endpoint_total_timeout_s)

    @property
    def spool_dir(self) -> Path:
        """Where uploads are streamed to while they are checked (never secrets)."""
        return self.data_dir / "spool"

    @property
    def call_limits(self) -> CallLimits:
        return CallLimits(max_calls=self.max_concurrent_rpcs,
                          max_calls_per_principal=self.max_calls_per_principal,
                          idle_timeout=self.stream_idle_timeout,
                          min_upload_rate=self.min_upload_rate,
                          rate_grace=self.upload_rate_grace,
                          principal_recheck=self.principal_recheck,
                          max_stream_seconds=self.max_stream_seconds,
                          exempt_lifetime=self.exempt_stream_lifetime)

    def check_listen(self) -> None:
        """Refuse a non-loopback address without TLS unless `--insecure` was given."""
        host = self.listen.rsplit(":", 1)[0].strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and self.tls_cert is None and not self.insecure:
            raise ValueError(f"refusing to listen on {self.listen} without TLS: give --tls-cert and "
                             "--tls-key, or --insecure if a proxy terminates TLS")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")


def load_keyring(config: ServerConfig) -> MasterKeyring:
    """The master keyring from the environment, a file, or the data dir (created once)."""
    if os.environ.get(MASTER_KEY_ENV):
        return keyring_from_env(os.environ[MASTER_KEY_ENV])
    if config.master_key_file is not None:
        return keyring_from_file(config.master_key_file)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return load_or_create_keyring(config.data_dir / "master.key")


def keyring_path(config: ServerConfig) -> Path | None:
    """The file rotation writes to (None when the keyring comes from the environment)."""
    if os.environ.get(MASTER_KEY_ENV):
        return None
    return config.master_key_file or config.data_dir / "master.key"


def load_signing_key(config: ServerConfig) -> SigningKey:
    """The TTP's Ed25519 key from the environment, a file, or the data dir (created once)."""
    if os.environ.get(SIGNING_KEY_ENV):
        return signing_key_from_pem(os.environ[SIGNING_KEY_ENV].encode())
    if config.signing_key_file is not None:
        return signing_key_from_pem(config.signing_key_file.read_bytes())
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return load_or_create_signing_key(config.data_dir / "signing.pem")
