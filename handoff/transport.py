"""anyio TCP/TLS streams carrying protocol frames.

This is the one edge where anyio, ssl and OS errors become the library's own exceptions
(:func:`translate_errors`), in the manner of httpcore's exception mapping. Above this module
nothing catches ``OSError`` or ``anyio.BrokenResourceError``.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from handoff._errors import (
    BindError,
    ConfigError,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    HandoffError,
    HandshakeTimeout,
    HeartbeatTimeout,
    TLSError,
)
from handoff.protocol import Connection, Event, HandshakeComplete, Message, NodeState, PeerInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from handoff.config import TLSFiles

__all__ = (
    "PeerLink",
    "TLSContexts",
    "format_address",
    "open_connection",
    "open_listener",
    "secure_server_side",
    "translate_errors",
)

logger = logging.getLogger("handoff.transport")

RECEIVE_SIZE = 65536
LATE_READ_GRACE = 0.01


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextmanager
def translate_errors(remote: str) -> Iterator[None]:
    """Turn anyio, ssl and OS errors raised inside the block into :class:`HandoffError`."""
    try:
        yield
    except HandoffError:
        raise
    except ssl.SSLError as exc:
        raise TLSError(f"TLS with {remote} failed: {exc.reason or exc}") from exc
    except (anyio.EndOfStream, anyio.IncompleteRead) as exc:
        raise ConnectionClosed(f"{remote} closed the connection") from exc
    except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLError):
            raise TLSError(f"TLS with {remote} failed: {cause.reason or cause}") from exc
        raise ConnectionClosed(f"connection to {remote} broke: {cause or exc!r}") from exc
    except OSError as exc:
        raise ConnectionClosed(f"connection to {remote} failed: {exc.strerror or exc}") from exc


class TLSContexts:
    """Mutual TLS: both sides present a certificate signed by the cluster's CA.

    Peers are dialled by IP address, which certificates rarely name, so host names are not
    checked; trust comes from the CA (and, independently, from the cookie handshake).
    """

    def __init__(self, files: TLSFiles) -> None:
        try:
            self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files.ca)
            self.server.verify_mode = ssl.CERT_REQUIRED
            self.server.load_cert_chain(files.cert, files.key)
            self.client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca)
            self.client.check_hostname = False
            self.client.verify_mode = ssl.CERT_REQUIRED
            self.client.load_cert_chain(files.cert, files.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"cannot load TLS files (HANDOFF_TLS_CERT={files.cert}, HANDOFF_TLS_KEY="
                f"{files.key}, HANDOFF_TLS_CA={files.ca}): {exc}; they must be PEM files, "
                "the key matching the certificate"
            ) from exc


async def open_listener(host: str, port: int) -> anyio.abc.SocketListener:
    """Listen on ``host:port``; ``::`` listens dual-stack (IPv6 and IPv4-mapped).

    anyio's ``create_tcp_listener`` sets ``IPV6_V6ONLY`` on ``::``, so the socket is made
    here; Fly's proxy and checks come over IPv4 while peers use 6PN IPv6.
    """
    where = format_address(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(
            f"cannot listen on {where}: {host!r} is not an address of this machine "
            f"({exc.strerror}); set HANDOFF_BIND to host:port"
        ) from exc
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            hint = (
                "address already in use: another process (another node?) listens there; "
                "stop it or set HANDOFF_BIND to a free port"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = "no interface of this machine has that address; set HANDOFF_BIND"
        elif exc.errno == errno.EACCES:
            hint = "permission denied (ports below 1024 need privileges); use a higher port"
        else:
            hint = exc.strerror or str(exc)
        raise BindError(f"cannot listen on {where}: {hint}") from exc
    return await anyio.abc.SocketListener.from_socket(sock)


async def open_connection(
    host: str, port: int, *, time_limit: float, tls: ssl.SSLContext | None = None
) -> anyio.abc.ByteStream:
    """Connect to a peer (and run the TLS handshake), all within ``time_limit`` seconds."""
    remote = format_address(host, port)
    stream: anyio.abc.ByteStream | None = None
    try:
        with anyio.fail_after(time_limit):
            stream = await anyio.connect_tcp(host, port)
            if tls is not None:
                with translate_errors(remote):
                    stream = await TLSStream.wrap(
                        stream, server_side=False, ssl_context=tls, standard_compatible=False
                    )
    except TimeoutError as exc:
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        raise ConnectTimeout(f"connecting to {remote} took over {time_limit:g} s") from exc
    except HandoffError:
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        raise
    except OSError as exc:
        raise ConnectError(f"cannot connect to {remote}: {exc.strerror or exc}") from exc
    return stream


async def secure_server_side(
    stream: anyio.abc.ByteStream, tls: ssl.SSLContext, *, time_limit: float, remote: str
) -> anyio.abc.ByteStream:
    """Run the server side of the TLS handshake within ``time_limit`` seconds."""
    try:
        with anyio.fail_after(time_limit), translate_errors(remote):
            return await TLSStream.wrap(
                stream, server_side=True, ssl_context=tls, standard_compatible=False
            )
    except TimeoutError as exc:
        raise HandshakeTimeout(f"TLS handshake with {remote} took over {time_limit:g} s") from exc


class PeerLink:
    """Drives one protocol :class:`Connection` over an anyio byte stream.

    One task reads (``handshake`` then ``next_events``); any task may ``send``. Timers
    (heartbeats, timeouts) run inside ``next_events`` from the connection's own deadline.

    Every write is bounded by ``send_timeout``: a peer that stops reading (its process
    paused, its socket buffers full) would otherwise block the writer, and with it the
    heartbeat check queued behind the same lock, forever. A write cut off half way leaves
    part of a frame on the wire, so the link is closed then.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        connection: Connection,
        remote: str,
        *,
        clock: Callable[[], float] = anyio.current_time,
        send_timeout: float = 5.0,
    ) -> None:
        self.connection = connection
        self.remote = remote
        self._stream = stream
        self._clock = clock
        self._send_lock = anyio.Lock()
        self._send_timeout = send_timeout
        self._broken = False
        self.last_received = clock()
        """When bytes last arrived from the peer (``clock`` time): the mesh refuses to
        replace a link heard from within its heartbeat timeout."""

    @property
    def peer(self) -> PeerInfo | None:
        """The authenticated peer, once the handshake completed."""
        return self.connection.peer

    async def _flush(self, time_limit: float | None = None) -> None:
        # Waiting for the lock is bounded too: by its holder's own time limit.
        async with self._send_lock:
            # Taken under the lock so that concurrent senders keep frame order.
            data = self.connection.data_to_send()
            if not data:
                return
            if self._broken:
                raise ConnectionClosed(f"the link to {self.remote} was closed mid-frame")
            limit = self._send_timeout if time_limit is None else time_limit
            try:
                with anyio.fail_after(max(0.0, limit)), translate_errors(self.remote):
                    await self._stream.send(data)
            except TimeoutError:
                self._broken = True
                await anyio.aclose_forcefully(self._stream)
                if time_limit is None:
                    raise HeartbeatTimeout(
                        f"{self.remote} stopped reading: a write was blocked for {limit:g} s"
                    ) from None
                raise ConnectionClosed(
                    f"a write to {self.remote} did not finish in {limit:g} s; link closed"
                ) from None

    async def handshake(self) -> tuple[PeerInfo, list[Event]]:
        """Run the handshake; return the peer and any events that arrived with it."""
        while True:
            events = await self.next_events()
            for index, event in enumerate(events):
                if isinstance(event, HandshakeComplete):
                    return event.peer, events[index + 1 :]

    async def next_events(self) -> list[Event]:
        """Wait for the next protocol events, keeping heartbeats and timeouts on time.

        Raises :class:`HandoffError` subclasses: ``ConnectionClosed``, ``HeartbeatTimeout``,
        ``HandshakeTimeout``, ``ProtocolError``, handshake errors.
        """
        while True:
            try:
                await self._flush()
                deadline = self.connection.next_deadline()
                data = b""
                # A deadline already past (this task was busy: a long session message)
                # must not count the peer silent while its bytes wait in the socket, so
                # there is always one short look before the timers run.
                with anyio.move_on_after(max(LATE_READ_GRACE, deadline - self._clock())):
                    with translate_errors(self.remote):
                        data = await self._stream.receive(RECEIVE_SIZE)
                if data:
                    self.last_received = self._clock()
                    events = self.connection.receive_data(data, now=self.last_received)
                    await self._flush()
                    if events:
                        return events
                    continue
                self.connection.tick(now=self._clock())
            except HandoffError:
                await self._flush_quietly()
                raise

    async def _flush_quietly(self) -> None:
        # Tell the peer why (a queued Reject), but never wait long on a broken peer.
        with anyio.move_on_after(0.5):
            with suppress(HandoffError):
                await self._flush()

    async def send(self, message: Message, *, time_limit: float | None = None) -> None:
        """Send a session message, within ``time_limit`` seconds if given (else within the
        send timeout). Past the limit the link is closed and ``ConnectionClosed`` raised."""
        self.connection.send(message, now=self._clock())
        await self._flush(time_limit)

    async def set_local_state(self, state: NodeState) -> None:
        """Tell the peer this node changed state."""
        self.connection.set_local_state(state, now=self._clock())
        await self._flush()

    async def aclose(self, reason: str = "closing") -> None:
        """Say goodbye (best effort, bounded) and close the stream."""
        self.connection.close(reason)
        with anyio.CancelScope(shield=True):
            await self._flush_quietly()
            await anyio.aclose_forcefully(self._stream)
