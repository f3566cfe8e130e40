"""The endpoint client against hostile servers: each refused with its typed error, and nothing
sent past the refusal. Real sockets: a threaded http.server on loopback (tests/
hostile_endpoints.py) answers as each test scripts it; DNS is a scripted resolver handed to
the session, as the key server hands it socket.getaddrinfo.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from freemark.endpoint import EndpointPolicy, EndpointRateLimiter, EndpointSession
from freemark.errors import (
    EndpointBudgetError,
    EndpointError,
    EndpointInconsistentError,
    EndpointNotAllowedError,
    EndpointResponseError,
    EndpointTimeoutError,
    EndpointUnreachableError,
)
from hostile_endpoints import (
    MODEL,
    Handler,
    Resolver,
    Script,
    Seen,
    endpoint,
    honest,
    honest_answers,
    infer_reply,
    metadata,
    request_inputs,
)

LOOPBACK = EndpointPolicy(allow=("127.0.0.1",), connect_timeout_s=2, read_timeout_s=2,
                          total_timeout_s=10)
X = np.random.default_rng(0).random((40, 4)).astype(np.float32)


def _session(url: str, policy: EndpointPolicy = LOOPBACK, **kw: object) -> EndpointSession:
    return EndpointSession(url, MODEL, policy=policy, **kw)  # type: ignore[arg-type]


# --- honest, for contrast: answers, batching and a transcript bound to the bytes on the wire --


@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_an_honest_endpoint_answers_in_batches_and_the_transcript_hashes_the_wire(kind: str
                                                                                  ) -> None:
    policy = EndpointPolicy(allow=("127.0.0.1",), max_batch=16, repeats=8)
    with endpoint(honest(kind)) as server:
        session = _session(server.url, policy)
        answers = session.answer(X)
        transcript = session.transcript()
    assert session.kind == kind
    expected = honest_answers(X, kind)
    np.testing.assert_array_equal(answers, expected)
    assert answers.dtype == (np.int64 if kind == "labels" else np.float32)
    # 40 inputs and 8 repeats in batches of 16: metadata, then three infer requests.
    assert [e.method for e in transcript.exchanges] == ["GET", "POST", "POST", "POST"]
    assert [len(request_inputs(json.loads(s.body))) for s in server.infers()] == [16, 16, 16]
    assert transcript.inputs_sent == 48
    for exchange, seen in zip(transcript.exchanges, server.seen, strict=True):
        assert exchange.request_sha256 == hashlib.sha256(seen.body).hexdigest()
        assert exchange.response_sha256 == hashlib.sha256(seen.answered).hexdigest()
        assert exchange.path == seen.path
    assert transcript.endpoint == server.url and transcript.address == "127.0.0.1"
    assert (transcript.model_name, transcript.model_version) == (MODEL, "1")
    assert transcript.started_at <= transcript.finished_at


# --- destinations: allow-list, redirects, DNS -----------------------------------------------


def test_a_url_outside_the_allow_list_is_refused_before_any_request() -> None:
    with endpoint(honest()) as server:
        for policy in (EndpointPolicy(), EndpointPolicy(allow=("10.0.0.0/8", "models.test"))):
            with pytest.raises(EndpointNotAllowedError, match="allow"):
                _session(server.url, policy)
        assert server.seen == []


def test_a_listed_name_admits_no_loopback_address_unless_an_address_entry_names_it() -> None:
    with endpoint(honest()) as server:
        url = f"http://models.test:{server.port}"
        with pytest.raises(EndpointNotAllowedError, match="not a public address"):
            _session(url, EndpointPolicy(allow=("models.test",)),
                     resolver=Resolver([["127.0.0.1"]]))
        # Named as an address, loopback is allowed, whatever name points at it.
        session = _session(url, EndpointPolicy(allow=("127.0.0.0/8",)),
                           resolver=Resolver([["127.0.0.1"]]))
        np.testing.assert_array_equal(session.answer(X), honest_answers(X, "labels"))
        # The Host header keeps the name while the socket went to the checked address.
        assert all(s.path.startswith("/v2/models/m") for s in server.seen)


def test_a_redirect_is_refused_even_to_an_allowed_host_and_never_followed() -> None:
    def redirect(handler: Handler, seen: Seen) -> None:
        handler.send_body(seen, b"", 302, {"Location": "http://169.254.169.254/latest/meta-data"})

    with endpoint(redirect) as server:
        with pytest.raises(EndpointNotAllowedError, match=r"302.*169\.254\.169\.254.*never followed"):
            _session(server.url).answer(X)
        assert len(server.seen) == 1


def test_dns_is_asked_once_and_the_connection_goes_to_the_checked_address() -> None:
    # The name rebinds to 127.0.0.2 after the first answer: outside the allow-list, and no
    # server listens there, so a second lookup (or a connection by name) would show.
    resolver = Resolver([["127.0.0.1"], ["127.0.0.2"]])
    with endpoint(honest()) as server:
        session = _session(f"http://models.test:{server.port}", resolver=resolver)
        np.testing.assert_array_equal(session.answer(X), honest_answers(X, "labels"))
        session.answer(X[:5])
    assert resolver.calls == ["models.test"]
    assert session.transcript().address == "127.0.0.1"
    # metadata, two batches (40 inputs and 32 repeats), one batch: all at the checked address
    assert len(server.seen) == 4


def test_every_dns_answer_must_pass_not_just_the_first() -> None:
    with endpoint(honest()) as server:
        with pytest.raises(EndpointNotAllowedError, match=r"resolved to 127\.0\.0\.2"):
            _session(f"http://models.test:{server.port}",
                     resolver=Resolver([["127.0.0.1", "127.0.0.2"]]))
        with pytest.raises(EndpointNotAllowedError, match=r"resolved to 127\.0\.0\.1"):
            _session(f"http://models.test:{server.port}",
                     resolver=Resolver([["::ffff:127.0.0.1"]]), policy=EndpointPolicy(
                         allow=("127.0.0.2",)))
        assert server.seen == []


def test_a_name_that_does_not_resolve_or_a_closed_port_is_unreachable() -> None:
    def nxdomain(*args: object, **kwargs: object) -> list[tuple[object, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(EndpointUnreachableError, match="does not resolve"):
        _session("http://nowhere.test:80", resolver=nxdomain)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(EndpointUnreachableError, match="cannot connect"):
        _session(f"http://127.0.0.1:{closed}").answer(X)


# --- TLS: verified on the name, connected to the checked address ------------------------------


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_verifies_the_certificate_for_the_name_at_the_checked_address(tmp_path: Path
                                                                            ) -> None:
    cert, key = _certificate(tmp_path, "models.test")
    with endpoint(honest()) as server:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        url = f"https://models.test:{server.port}"
        # A certificate no trusted CA signed: refused (the default context verifies).
        with pytest.raises(EndpointUnreachableError, match="certificate does not verify"):
            _session(url, resolver=Resolver([["127.0.0.1"]])).answer(X)
        # Trusted, and valid for the name (not for 127.0.0.1): SNI and verification use the
        # name while the socket goes to the checked address.
        trusting = ssl.create_default_context(cafile=str(cert))
        session = _session(url, resolver=Resolver([["127.0.0.1"]]), ssl_context=trusting)
        np.testing.assert_array_equal(session.answer(X), honest_answers(X, "labels"))
        # A certificate for another name is refused even when its CA is trusted.
        with pytest.raises(EndpointUnreachableError, match="certificate does not verify"):
            _session(f"https://other.test:{server.port}", resolver=Resolver([["127.0.0.1"]]),
                     ssl_context=trusting).answer(X)


# --- time: never answering, dripping ---------------------------------------------------------


def test_an_endpoint_that_never_answers_hits_the_read_deadline() -> None:
    def silent(handler: Handler, seen: Seen) -> None:
        handler.server.stop.wait(30)  # type: ignore[attr-defined]

    policy = EndpointPolicy(allow=("127.0.0.1",), read_timeout_s=0.5, total_timeout_s=30)
    with endpoint(silent) as server, \
            pytest.raises(EndpointTimeoutError, match="took nothing for 0.5 s"):
        _session(server.url, policy).answer(X)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_drip_under_the_read_deadline_is_cut_at_the_total_deadline(where: str) -> None:
    def drip(handler: Handler, seen: Seen) -> None:
        body = json.dumps(metadata()).encode()
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        whole = head + body
        start = 0 if where == "headers" else len(head)
        handler.wfile.write(whole[:start])
        handler.wfile.flush()
        for i in range(start, len(whole)):
            if handler.server.stop.wait(0.05):  # type: ignore[attr-defined]
                return
            try:
                handler.wfile.write(whole[i:i + 1])
                handler.wfile.flush()
            except OSError:
                return

    policy = EndpointPolicy(allow=("127.0.0.1",), read_timeout_s=1.0, total_timeout_s=1.5)
    with endpoint(drip) as server, pytest.raises(EndpointTimeoutError, match="total deadline"):
        _session(server.url, policy).answer(X)


# --- size: a gigabyte ------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False])
def test_a_gigabyte_is_refused_at_the_cap_without_holding_it(declared: bool) -> None:
    gigabyte = 2**30
    sent = []

    def huge(handler: Handler, seen: Seen) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if declared:
            handler.send_header("Content-Length", str(gigabyte))
        handler.send_header("Connection", "close")
        handler.end_headers()
        chunk = b" " * 2**20
        total = 0
        try:
            while total < gigabyte and not handler.server.stop.is_set():  # type: ignore
                handler.wfile.write(chunk)
                total += len(chunk)
        except OSError:
            pass
        sent.append(total)

    cap = 4 * 2**20
    policy = EndpointPolicy(allow=("127.0.0.1",), max_response_bytes=cap)
    with endpoint(huge) as server:
        tracemalloc.start()
        try:
            with pytest.raises(EndpointResponseError, match=f"{cap}-byte cap"):
                _session(server.url, policy).answer(X)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 4 * cap  # never held anything near a gigabyte
    if not declared:
        assert sent and sent[0] < gigabyte  # the server was cut off, not read out


# --- what the answers say ----------------------------------------------------------------------


@pytest.mark.parametrize(("body", "match"), [
    (b"{not json", "not valid JSON"),
    (b'{"name": "m", "versions": ["1"], "inputs": NaN}', "not valid JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (json.dumps({**metadata(), "name": "other"}).encode(), "for model 'other'"),
    (json.dumps({**metadata(), "outputs": [{"name": "p", "datatype": "FP32",
                                            "shape": [-1]}]}).encode(), "reads exactly one"),
    (json.dumps({**metadata(), "inputs": [{"name": "x", "datatype": "FP32",
                                           "shape": [-1, 5]}]}).encode(), "right model"),
])
def test_malformed_or_unfitting_metadata_is_refused(body: bytes, match: str) -> None:
    def script(handler: Handler, seen: Seen) -> None:
        handler.send_body(seen, body)

    with endpoint(script) as server:
        with pytest.raises(EndpointResponseError, match=match):
            _session(server.url).answer(X)
        assert server.infers() == []


def _lying(mutate: Callable[[dict[str, Any]], dict[str, Any]], kind: str = "labels") -> Script:
    def script(handler: Handler, seen: Seen) -> None:
        if seen.method == "GET":
            handler.send_json(seen, metadata(kind))
            return
        request = json.loads(seen.body)
        reply = infer_reply(request, honest_answers(request_inputs(request), kind), kind)
        handler.send_json(seen, mutate(reply))

    return script


def _output(reply: dict[str, Any], **changes: object) -> dict[str, Any]:
    reply["outputs"][0].update(changes)
    return reply


@pytest.mark.parametrize(("kind", "mutate", "match"), [
    ("labels", lambda r: _output(r, shape=[len(r["outputs"][0]["data"]) - 1],
                                 data=r["outputs"][0]["data"][:-1]), "shape"),
    ("labels", lambda r: _output(r, datatype="FP32"), "came as 'FP32'"),
    ("labels", lambda r: _output(r, data=[float(v) for v in r["outputs"][0]["data"]]),
     "not .* integers"),
    ("labels", lambda r: _output(r, data=[-1] * len(r["outputs"][0]["data"])), "negative"),
    ("scores", lambda r: _output(r, shape=[r["outputs"][0]["shape"][0], 4],
                                 data=r["outputs"][0]["data"]), "shape"),
    ("scores", lambda r: _output(r, data=["0.1"] * len(r["outputs"][0]["data"])),
     "not .* numbers"),
    ("labels", lambda r: {**r, "model_name": "other"}, "from model 'other'"),
    ("labels", lambda r: {**r, "id": "not-mine"}, "id is not the request's"),
    ("labels", lambda r: {**r, "outputs": []}, "0 outputs named"),
])
def test_the_wrong_shape_dtype_or_model_is_refused(
        kind: str, mutate: Callable[[dict[str, Any]], dict[str, Any]], match: str) -> None:
    with endpoint(_lying(mutate, kind)) as server, \
            pytest.raises(EndpointResponseError, match=match):
        _session(server.url).answer(X)


def test_an_http_error_is_refused_with_its_status_and_an_escaped_excerpt() -> None:
    def script(handler: Handler, seen: Seen) -> None:
        handler.send_body(seen, b'{"error": "model \x1b[31mmissing"}' + b"x" * 10000, 404)

    with endpoint(script) as server, \
            pytest.raises(EndpointResponseError, match="HTTP 404") as caught:
        _session(server.url).answer(X)
    assert "\x1b" not in str(caught.value) and len(str(caught.value)) < 600


# --- lying: different answers to the same query -------------------------------------------------


@pytest.mark.parametrize("liar", ["random", "by_position"])
def test_an_endpoint_whose_answers_are_not_a_function_of_its_inputs_is_refused(liar: str
                                                                                ) -> None:
    rng = np.random.default_rng(5)

    def answers(x: np.ndarray) -> np.ndarray:
        if liar == "random":
            return rng.integers(0, 3, size=len(x))
        return np.arange(len(x)) % 3  # a batch position, not the input, decides

    with endpoint(honest(answers=answers)) as server, \
            pytest.raises(EndpointInconsistentError, match="repeated queries differently"):
        _session(server.url).answer(X)


def test_a_rare_disagreement_within_the_tolerance_is_not_refused() -> None:
    calls = []

    def answers(x: np.ndarray) -> np.ndarray:
        calls.append(1)
        got = honest_answers(x, "labels")
        if len(calls) == 1:
            got[0] = (got[0] + 1) % 3  # one flip in the whole verification
        return got

    policy = EndpointPolicy(allow=("127.0.0.1",), repeats=32, max_disagreement=0.1)
    with endpoint(honest(answers=answers)) as server:
        got = _session(server.url, policy).answer(X)
    assert np.count_nonzero(got != honest_answers(X, "labels")) <= 1


# --- budgets ---------------------------------------------------------------------------------


def test_the_query_budget_and_the_rate_limit_refuse_before_sending() -> None:
    with endpoint(honest()) as server:
        small = EndpointPolicy(allow=("127.0.0.1",), query_budget=50, repeats=8)
        session = _session(server.url, small)
        session.answer(X[:20])  # 28 of 50
        with pytest.raises(EndpointBudgetError, match="budget of one verification") as caught:
            session.answer(X[:20])
        assert caught.value.retry_after is None
        assert len(server.infers()) == 1

        rated = EndpointPolicy(allow=("127.0.0.1",), repeats=0, rate_inputs=60,
                               rate_window_s=600)
        limiter = EndpointRateLimiter(rated)
        _session(server.url, rated, limiter=limiter).answer(X)  # 40 of 60
        with pytest.raises(EndpointBudgetError, match="rate limit") as caught:
            _session(server.url, rated, limiter=limiter).answer(X)
        assert caught.value.retry_after == pytest.approx(200, rel=0.05)
        assert len(server.infers()) == 2


def test_a_batch_over_the_request_limit_is_split_and_one_query_over_it_refused() -> None:
    with endpoint(honest()) as server:
        one = len(json.dumps(X[0].tolist()))
        policy = EndpointPolicy(allow=("127.0.0.1",), repeats=0, max_request_bytes=600 + 9 * one)
        got = _session(server.url, policy).answer(X)
        np.testing.assert_array_equal(got, honest_answers(X, "labels"))
        sizes = [len(request_inputs(json.loads(s.body))) for s in server.infers()]
        assert sum(sizes) == len(X) and max(sizes) < len(X)
        assert all(len(s.body) <= policy.max_request_bytes for s in server.infers())
        tiny = EndpointPolicy(allow=("127.0.0.1",), repeats=0, max_request_bytes=100)
        with pytest.raises(EndpointBudgetError, match="one query is"):
            _session(server.url, tiny).answer(X)
        assert len(server.infers()) == len(sizes)


def test_every_endpoint_refusal_names_a_reason() -> None:
    from freemark.v1 import errors_pb2

    declared = set(errors_pb2.ErrorReason.keys())
    classes: list[type[EndpointError]] = [EndpointNotAllowedError, EndpointUnreachableError, EndpointTimeoutError,
               EndpointResponseError, EndpointInconsistentError, EndpointBudgetError]
    assert all(issubclass(c, EndpointError) and c.REASON in declared for c in classes)
    assert {n for n in declared if n.startswith("ENDPOINT_")} == {c.REASON for c in classes}
