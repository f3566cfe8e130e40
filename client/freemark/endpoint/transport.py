"""One HTTP exchange with an untrusted server, under the policy's deadlines and caps.

Built on the standard library's `http.client` rather than urllib3 or requests: it follows no
redirects, decompresses nothing and pools nothing on its own, and its one connection hook
(`_create_connection`) lets the socket go to the address the allow-list checked while the
Host header, TLS SNI and certificate verification keep the name. urllib3 would need the same
hook plus switching off its retries, redirects and pool; a hand-written socket would need its
own HTTP parser, the part most worth not writing again. What `http.client` lacks is a
total deadline and a size cap: every read from the socket goes through `_DeadlineReader`,
which sets the socket's timeout to the smaller of the read deadline and the time left, and
the body is read in chunks and refused once past the cap.

One connection per request (`Connection: close`), each to the checked address: measured on
loopback (bench/endpoint.py), a connection costs about 0.2 ms and the same requests over one
kept-alive connection took as long, so keep-alive would save nothing worth a reused
connection's state (a server closing it between requests, a retried POST). What did cost
time was the client's own work done while the endpoint sat idle; `send` and
`Pending.reply` split an exchange so that the caller does that work while the endpoint
computes (`freemark.endpoint.session`), still one request in flight at a time.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from freemark.errors import (
    EndpointNotAllowedError,
    EndpointResponseError,
    EndpointTimeoutError,
    EndpointUnreachableError,
)

__all__ = ["Destination", "Pending", "Reply", "excerpt", "exchange", "send"]

_CHUNK = 64 * 1024
_ERROR_EXCERPT_BYTES = 2048  # what an error status's body may contribute to a message


@dataclass(frozen=True)
class Destination:
    """Where a request goes: the URL's scheme, name and port, and the checked address."""

    scheme: str  # "http" or "https"
    host: str  # the name (or address literal) from the URL: Host header, SNI, certificate
    port: int
    address: str  # the allow-listed address the socket connects to


@dataclass(frozen=True)
class Reply:
    """A 2xx answer: its status and its whole body (at most the cap)."""

    status: int
    body: bytes


class _TotalDeadline(Exception):
    """Raised inside a read when the conversation's total deadline has passed."""


def excerpt(data: bytes | str, limit: int = 200) -> str:
    """A short, escaped excerpt of what an endpoint sent, safe to put in a message or log."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    cut = text[:limit]
    return repr(cut) + ("..." if len(text) > limit else "")


class _DeadlineReader(io.RawIOBase):
    """The socket's byte stream, each read bounded by the read deadline and the time left."""

    def __init__(self, sock: socket.socket, read_timeout: float, deadline: float,
                 monotonic: Callable[[], float]) -> None:
        self._sock, self._read, self._deadline, self._now = sock, read_timeout, deadline, monotonic
        # The socket's own raw file holds a reference, so the connection closing its socket
        # (as http.client does on `Connection: close`) leaves the response readable.
        self._raw = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - self._now()
        if left <= 0:
            raise _TotalDeadline
        self._sock.settimeout(min(self._read, left))
        try:
            return self._raw.readinto(buffer) or 0
        except TimeoutError:
            if left < self._read:  # the wait was the rest of the total, not the read deadline
                raise _TotalDeadline from None
            raise

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What `http.client.HTTPResponse` reads from: the socket, behind `_DeadlineReader`."""

    def __init__(self, reader: _DeadlineReader) -> None:
        self._reader = reader

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(self._reader)


def _connection(destination: Destination, connect_timeout: float,
                context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    conn: http.client.HTTPConnection
    if destination.scheme == "https":
        conn = http.client.HTTPSConnection(destination.host, destination.port,
                                           timeout=connect_timeout,
                                           context=context or ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(destination.host, destination.port,
                                          timeout=connect_timeout)

    def pinned(_address: tuple[str, int], timeout: float, source: Any = None) -> socket.socket:
        # The socket goes to the checked address, never to a fresh lookup of the name.
        return socket.create_connection((destination.address, destination.port), timeout, source)

    conn._create_connection = pinned  # type: ignore[attr-defined]
    return conn


class Pending:
    """A request sent on its own connection, its reply not yet read (`send`).

    Between the two the caller may do its own work (encode the next batch, decode the last
    reply) while the endpoint computes this one; the reply is still read under the same
    deadlines and cap. `reply` ends the connection, and so does `close`, for a caller that
    fails in between.
    """

    def __init__(self, conn: http.client.HTTPConnection, where: str, read_timeout: float,
                 deadline: float, max_bytes: int, monotonic: Callable[[], float]) -> None:
        self._conn, self._where, self._read = conn, where, read_timeout
        self._deadline, self._max, self._now = deadline, max_bytes, monotonic

    def reply(self) -> Reply:
        """The 2xx reply, read whole (at most the cap), or the `EndpointError` that fits."""
        try:
            with _mapped(self._where, self._read, self._deadline, self._now):
                return _read(self._conn.getresponse(), self._where, self._max)
        finally:
            self._conn.close()

    def close(self) -> None:
        """End the connection unread (a caller that failed before `reply`)."""
        self._conn.close()


@contextlib.contextmanager
def _mapped(where: str, read_timeout: float, deadline: float,
            monotonic: Callable[[], float]) -> Iterator[None]:
    """Socket and HTTP failures of a sent request or its reply, as the `EndpointError`s that
    fit (deadline, malformed HTTP, a broken connection)."""
    try:
        yield
    except _TotalDeadline:
        raise EndpointTimeoutError(
            f"{where}: the endpoint did not finish inside the verification's total deadline; "
            "a server this slow cannot be verified") from None
    except TimeoutError:
        if monotonic() >= deadline:  # sending the request ran into the total deadline
            raise EndpointTimeoutError(
                f"{where}: the endpoint did not take the request inside the verification's "
                "total deadline") from None
        raise EndpointTimeoutError(
            f"{where}: the endpoint sent or took nothing for {read_timeout:g} s (the read "
            "deadline)") from None
    except http.client.HTTPException as e:
        raise EndpointResponseError(
            f"{where}: not a valid HTTP response ({e.__class__.__name__}: "
            f"{excerpt(str(e), 80)})") from None
    except OSError as e:
        raise EndpointUnreachableError(
            f"{where}: the connection failed mid-exchange ({e.__class__.__name__}: "
            f"{e.strerror or e})") from None


def send(destination: Destination, method: str, path: str, body: bytes | None, *,
         connect_timeout: float, read_timeout: float, deadline: float, max_bytes: int,
         monotonic: Callable[[], float], context: ssl.SSLContext | None = None) -> Pending:
    """Connect to the checked address and send one request; its reply is read by the
    returned `Pending`. Raises the `EndpointError` that fits a failure to connect or send.

    `deadline` is on the `monotonic` clock: the total deadline of the whole conversation.
    """
    where = f"{destination.scheme}://{destination.host}:{destination.port}{path}"
    left = deadline - monotonic()
    if left <= 0:
        raise EndpointTimeoutError(f"{where}: the total deadline of the verification passed "
                                   "before this request")
    conn = _connection(destination, min(connect_timeout, left), context)
    try:
        try:
            conn.connect()
        except TimeoutError:
            raise EndpointTimeoutError(
                f"{where}: no connection within the {min(connect_timeout, left):g} s connect "
                "deadline; is the server up and reachable from here?") from None
        except ssl.SSLCertVerificationError as e:
            raise EndpointUnreachableError(
                f"{where}: its TLS certificate does not verify for {destination.host!r} "
                f"({e.verify_message}); the key server only queries endpoints whose certificate "
                "a public CA signs for that name") from None
        except (ssl.SSLError, OSError) as e:
            raise EndpointUnreachableError(
                f"{where}: cannot connect to {destination.address} ({e.__class__.__name__}: "
                f"{e.strerror or e}); check the URL and that the server is up") from None
        assert conn.sock is not None
        sock: socket.socket = conn.sock
        reader = _DeadlineReader(sock, read_timeout, deadline, monotonic)
        conn.response_class = lambda _sock, **kw: http.client.HTTPResponse(  # type: ignore
            _DeadlineSocket(reader), **kw)  # type: ignore[arg-type]
        headers = {"Connection": "close", "Accept": "application/json",
                   "Accept-Encoding": "identity"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        with _mapped(where, read_timeout, deadline, monotonic):
            sock.settimeout(min(read_timeout, max(deadline - monotonic(), 1e-3)))
            conn.request(method, path, body=body, headers=headers)
    except BaseException:
        conn.close()
        raise
    return Pending(conn, where, read_timeout, deadline, max_bytes, monotonic)


def exchange(destination: Destination, method: str, path: str, body: bytes | None, *,
             connect_timeout: float, read_timeout: float, deadline: float, max_bytes: int,
             monotonic: Callable[[], float], context: ssl.SSLContext | None = None) -> Reply:
    """Send one request and return its 2xx reply, or raise the `EndpointError` that fits
    (`send`, then `Pending.reply`)."""
    return send(destination, method, path, body, connect_timeout=connect_timeout,
                read_timeout=read_timeout, deadline=deadline, max_bytes=max_bytes,
                monotonic=monotonic, context=context).reply()


def _read(response: http.client.HTTPResponse, where: str, max_bytes: int) -> Reply:
    status = response.status
    if 300 <= status < 400:
        location = response.getheader("Location") or "(no Location)"
        raise EndpointNotAllowedError(
            f"{where}: answered HTTP {status}, a redirect to {excerpt(location, 120)}; redirects "
            "are never followed (a redirect could lead anywhere the allow-list forbids): give "
            "the endpoint's final URL")
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise EndpointResponseError(f"{where}: the body is {excerpt(encoding, 40)}-encoded; "
                                    "only identity encoding is read (no decompression)")
    if not 200 <= status < 300:
        detail = _body(response, where, _ERROR_EXCERPT_BYTES, truncate=True)
        raise EndpointResponseError(f"{where}: answered HTTP {status} {excerpt(response.reason, 60)}"
                                    f": {excerpt(detail)}")
    return Reply(status, _body(response, where, max_bytes))


def _body(response: http.client.HTTPResponse, where: str, max_bytes: int, *,
          truncate: bool = False) -> bytes:
    """The body, read in chunks and refused (or, for an error excerpt, cut) past `max_bytes`:
    the size is checked while reading, never after holding it all."""
    declared = response.getheader("Content-Length")
    if declared is not None and not truncate:
        try:
            size = int(declared)
        except ValueError:
            raise EndpointResponseError(f"{where}: invalid Content-Length "
                                        f"{excerpt(declared, 40)}") from None
        if size > max_bytes:
            raise EndpointResponseError(
                f"{where}: the response declares {size} bytes, over the {max_bytes}-byte cap; "
                "the body was not read")
    parts: list[bytes] = []
    total = 0
    while True:
        chunk = response.read(_CHUNK)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > max_bytes:
            if truncate:
                parts.append(chunk[: max_bytes - (total - len(chunk))])
                return b"".join(parts)
            raise EndpointResponseError(
                f"{where}: the response passed the {max_bytes}-byte cap while being read; it was "
                "cut off there")
        parts.append(chunk)
