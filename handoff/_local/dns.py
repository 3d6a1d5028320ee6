"""A small authoritative DNS server on loopback, for tests of DNS-based discovery."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import socket
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

__all__ = ("DNSResponder",)

logger = logging.getLogger("handoff.local")

# Without EDNS a UDP answer may not exceed 512 bytes (RFC 1035 4.2.1); dnspython's resolver
# sends no EDNS by default, so this is the limit that matters for it.
_UDP_LIMIT = 512
_TCP_LIMIT = 65535
_MAX_TCP_CONNECTIONS = 64
_TCP_BACKLOG = 128
_BIND_ATTEMPTS = 50

Zone = dict[dns.name.Name, dict[dns.rdatatype.RdataType, tuple[dns.rdata.Rdata, ...]]]


def _name(name: str | dns.name.Name) -> dns.name.Name:
    # Names are absolute whether or not the caller wrote the trailing dot; dnspython
    # compares and hashes names case-insensitively, which makes lookups case-insensitive.
    return name if isinstance(name, dns.name.Name) else dns.name.from_text(name)


def _ip(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is None or ip.version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address")
    return ip.compressed


def _txt_strings(record: str | bytes | Sequence[str | bytes]) -> list[bytes]:
    parts = [record] if isinstance(record, str | bytes) else list(record)
    strings: list[bytes] = []
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        # A character-string holds at most 255 bytes; longer text is split, as real
        # servers (and Fly's) do, and clients must join the pieces.
        strings.extend(data[i : i + 255] for i in range(0, len(data), 255))
        if not data:
            strings.append(b"")
    return strings


class _Connection:
    """A TCP client: bytes read so far and bytes still to write."""

    __slots__ = ("inbox", "outbox", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()


class DNSResponder:
    """A real authoritative DNS server for tests, serving a zone you change as you go.

    It answers over UDP and TCP (both on one port) on a loopback address, from a daemon
    thread, so it serves synchronous tests, tests under any event loop and child processes
    alike. Point the code under test at :attr:`server_spec` (the ``HANDOFF_DNS_SERVER``
    value)::

        with DNSResponder() as dns:
            dns.set_aaaa("shop.internal", ["fdaa::1", "fdaa::2"])
            os.environ["HANDOFF_DNS_SERVER"] = dns.server_spec
            ...

    Zone changes are thread-safe and apply to the next query. Names are case-insensitive,
    with or without the trailing dot. A name with no records at all answers NXDOMAIN; a
    name with records of other types only (or with names below it) answers NOERROR with an
    empty answer. Answers too large for UDP are sent truncated (TC flag set, answer
    section empty) so that clients retry over TCP. Malformed packets are ignored.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, ttl: int = 5) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"DNSResponder serves on loopback only, not {host!r}")
        self.ttl = ttl
        self._host = host
        self._requested_port = port
        self._lock = threading.Lock()
        self._zone: Zone = {}
        self._queries: list[tuple[str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind the sockets and start answering. Raises if started or closed before."""
        if self._thread is not None or self._closed:
            raise RuntimeError("DNSResponder can be started only once")
        self._udp, self._tcp = self._bind()
        self._address = (self._host, self._udp.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(
            target=self._serve, name=f"DNSResponder {self.server_spec}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop answering and release the port. Idempotent; returns within about 1 s."""
        if self._closed:
            return
        self._closed = True
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server answers on (UDP and TCP)."""
        if self._address is None:
            raise RuntimeError("DNSResponder is not started")
        return self._address

    @property
    def server_spec(self) -> str:
        """``host:port`` (``[::1]:port`` for IPv6), as ``HANDOFF_DNS_SERVER`` takes it."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- the zone ----------------------------------------------------------------------

    def set_a(self, name: str, ips: Iterable[str]) -> None:
        """Replace the A records of ``name`` (an empty list removes them)."""
        self._set(name, dns.rdatatype.A, [_ip(ip, 4) for ip in ips])

    def set_aaaa(self, name: str, ips: Iterable[str]) -> None:
        """Replace the AAAA records of ``name`` (an empty list removes them)."""
        self._set(name, dns.rdatatype.AAAA, [_ip(ip, 6) for ip in ips])

    def set_srv(self, name: str, records: Iterable[tuple[int, int, int, str]]) -> None:
        """Replace the SRV records of ``name``: ``(priority, weight, port, target)`` each."""
        self._set(
            name,
            dns.rdatatype.SRV,
            [f"{pri} {weight} {port} {_name(target)}" for pri, weight, port, target in records],
        )

    def set_txt(self, name: str, records: Iterable[str | bytes | Sequence[str | bytes]]) -> None:
        """Replace the TXT records of ``name``.

        Each item is one record: a string, or a sequence of strings sent as that record's
        separate character-strings. Strings longer than 255 bytes are split (as any server
        must), so clients have to join the pieces.
        """
        rdatas = [
            dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, _txt_strings(record))
            for record in records
        ]
        self._store(_name(name), dns.rdatatype.TXT, rdatas)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove the records of one type (``"A"``, ``"TXT"``...) of ``name``, or all of them."""
        key = _name(name)
        with self._lock:
            if rdtype is None:
                self._zone.pop(key, None)
                return
            types = self._zone.get(key)
            if types is not None:
                types.pop(dns.rdatatype.RdataType.make(rdtype), None)
                if not types:
                    del self._zone[key]

    def clear(self) -> None:
        """Remove every record."""
        with self._lock:
            self._zone.clear()

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every question received so far: ``(name, type)`` such as ``("shop.internal", "A")``.

        Names are lower case, without the trailing dot.
        """
        with self._lock:
            return list(self._queries)

    def clear_queries(self) -> None:
        """Forget the questions received so far."""
        with self._lock:
            self._queries.clear()

    def _set(self, name: str, rdtype: dns.rdatatype.RdataType, texts: list[str]) -> None:
        rdatas = [dns.rdata.from_text(dns.rdataclass.IN, rdtype, text) for text in texts]
        self._store(_name(name), rdtype, rdatas)

    def _store(
        self,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdatas: Sequence[dns.rdata.Rdata],
    ) -> None:
        with self._lock:
            if rdatas:
                self._zone.setdefault(name, {})[rdtype] = tuple(rdatas)
            else:
                types = self._zone.get(name)
                if types is not None:
                    types.pop(rdtype, None)
                    if not types:
                        del self._zone[name]

    # -- answering ---------------------------------------------------------------------

    def _answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The response to one query message, or ``None`` to ignore it.

        Over UDP the size limit is 512 bytes, or what the client's EDNS record advertises.
        """
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if query.flags & dns.flags.QR:
            return None
        try:
            response = dns.message.make_response(query)
        except Exception:
            return None
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
        elif len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
        else:
            self._resolve(query.question[0], response)
        if not udp:
            max_size = _TCP_LIMIT
        else:
            max_size = max(_UDP_LIMIT, query.payload) if query.edns >= 0 else _UDP_LIMIT
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            pass
        # Too big: an empty answer with TC tells the client to ask again over TCP.
        response.answer = []
        response.authority = []
        response.additional = []
        if udp:
            response.flags |= dns.flags.TC
        else:
            response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire(max_size=max_size)

    def _resolve(self, question: dns.rrset.RRset, response: dns.message.Message) -> None:
        name, rdtype = question.name, question.rdtype
        with self._lock:
            self._queries.append(
                (name.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(rdtype))
            )
            if question.rdclass != dns.rdataclass.IN:
                response.set_rcode(dns.rcode.REFUSED)
                return
            types = self._zone.get(name)
            if types is None:
                # A name with names below it exists (an "empty non-terminal", RFC 8020).
                if not any(known.is_subdomain(name) for known in self._zone):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return
            if rdtype == dns.rdatatype.ANY:
                found = list(types.items())
            else:
                found = [(rdtype, types[rdtype])] if rdtype in types else []
            ttl = self.ttl
        for _, rdatas in found:
            response.answer.append(dns.rrset.from_rdata_list(name, ttl, rdatas))

    # -- the serving thread ------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        last_error: OSError | None = None
        for _ in range(_BIND_ATTEMPTS if self._requested_port == 0 else 1):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self._host, self._requested_port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # An ephemeral UDP port may be taken for TCP: then try another one.
                tcp.bind((self._host, udp.getsockname()[1]))
                # Answers past 512 bytes (about 30 A records) come over TCP, and a cluster's
                # nodes poll in step: a short backlog drops their SYNs for a second.
                tcp.listen(_TCP_BACKLOG)
            except OSError as exc:
                udp.close()
                tcp.close()
                last_error = exc
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise OSError(f"DNSResponder could not bind UDP and TCP on one port: {last_error}")

    def _serve(self) -> None:
        assert self._udp is not None
        assert self._tcp is not None
        assert self._wake_r is not None
        connections: dict[socket.socket, _Connection] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ)
            selector.register(self._tcp, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._closed:
                    for key, events in selector.select(timeout=0.5):
                        try:
                            self._handle(selector, connections, key.fileobj, events)
                        except Exception:
                            # A test helper must keep answering whatever one client does.
                            logger.debug("DNSResponder: error while serving", exc_info=True)
            finally:
                for connection in connections.values():
                    connection.sock.close()

    def _handle(
        self,
        selector: selectors.BaseSelector,
        connections: dict[socket.socket, _Connection],
        fileobj: object,
        events: int,
    ) -> None:
        if fileobj is self._wake_r:
            return
        if fileobj is self._udp:
            self._serve_udp()
            return
        if fileobj is self._tcp:
            self._accept(selector, connections)
            return
        assert isinstance(fileobj, socket.socket)
        connection = connections[fileobj]
        try:
            keep = True
            if events & selectors.EVENT_READ:
                keep = self._read_tcp(connection)
            # Replies are sent as soon as they exist; EVENT_WRITE only resumes a partial send.
            if keep and connection.outbox:
                sent = connection.sock.send(connection.outbox)
                del connection.outbox[:sent]
        except (BlockingIOError, InterruptedError):
            keep = True
        except OSError:
            keep = False
        if not keep:
            selector.unregister(connection.sock)
            del connections[connection.sock]
            connection.sock.close()
            return
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.outbox else 0)
        selector.modify(connection.sock, wanted)

    def _serve_udp(self) -> None:
        assert self._udp is not None
        for _ in range(64):  # drain a burst, then let TCP clients have a turn
            try:
                wire, peer = self._udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # E.g. an ICMP error from an earlier reply to a client that went away.
                continue
            reply = self._answer(wire, udp=True)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(reply, peer)

    def _accept(
        self, selector: selectors.BaseSelector, connections: dict[socket.socket, _Connection]
    ) -> None:
        assert self._tcp is not None
        try:
            sock, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(connections) >= _MAX_TCP_CONNECTIONS:
            sock.close()
            return
        sock.setblocking(False)
        connections[sock] = _Connection(sock)
        selector.register(sock, selectors.EVENT_READ)

    def _read_tcp(self, connection: _Connection) -> bool:
        data = connection.sock.recv(65537)
        if not data:
            return False
        connection.inbox += data
        while len(connection.inbox) >= 2:
            size = int.from_bytes(connection.inbox[:2], "big")
            if len(connection.inbox) < 2 + size:
                break
            wire = bytes(connection.inbox[2 : 2 + size])
            del connection.inbox[: 2 + size]
            reply = self._answer(wire, udp=False)
            if reply is not None:
                connection.outbox += len(reply).to_bytes(2, "big") + reply
        return True
