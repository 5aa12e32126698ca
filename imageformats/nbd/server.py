"""A small asyncio NBD server for any imageformats block device.

Implements the fixed newstyle handshake and the transmission phase of the NBD
protocol (NetworkBlockDevice/nbd ``doc/proto.md``; section names are cited in
comments).  The handshake runs on an asyncio event loop; device I/O is
blocking, so the transmission phase of a plain connection runs on threads (a
reader, and one worker per connection that becomes up to ``workers`` when
requests are slow, each worker on its own ``device.clone()`` where the device
can be cloned; file data goes out with sendfile()), and TLS connections run
their requests in a shared thread pool.  Requests in flight and request sizes
are bounded.  Not implemented: the oldstyle handshake, extended headers
(NBD_OPT_EXTENDED_HEADERS is answered NBD_REP_ERR_UNSUP), NBD_CMD_RESIZE.

    server = NBDServer([Export("disk", device)])
    await server.start_unix("/tmp/sock")
    await server.serve_forever()
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..block import BlockDevice
from ..errors import ImageFormatError, NotFastError, UnsupportedFeatureError
from . import protocol as P

log = logging.getLogger("imageformats.nbd")

MiB = 1024 * 1024
DEFAULT_MAX_PAYLOAD = P.DEFAULT_MAX_PAYLOAD
#: Requests in flight per connection.
DEFAULT_MAX_INFLIGHT = 16
#: Most worker threads (device handles working at once) per connection.
DEFAULT_WORKERS = 4
#: A request busy for longer than this (seconds) lets its connection start another worker.
SLOW_REQUEST = 0.01
#: Longest option payload read into memory; longer ones are skipped and refused.
MAX_OPTION_LENGTH = 64 * 1024
#: A WRITE or option payload beyond this is treated as an attack: hard disconnect.
DISCARD_LIMIT = 64 * MiB
#: WRITE payload bytes held in memory per connection (received, not yet written) at most.
WRITE_BUDGET = 64 * MiB
#: Read buffers up to this size are reused by each worker thread; larger ones are allocated.
SCRATCH_MAX = 4 * MiB
#: Holes shorter than this in a READ are sent as data (not worth a chunk).
MIN_HOLE_CHUNK = 4096
#: At most this many content chunks per READ reply; the rest is sent as data.
MAX_READ_CHUNKS = 256
#: At most this many descriptors per block-status chunk ("SHOULD NOT send more than 2^20").
MAX_BLOCK_STATUS_EXTENTS = 1 << 20
META_CONTEXT_ID = 1


_TOO_BIG = object()  # marks a WRITE whose payload was skipped because it was too large


class _HardDisconnect(Exception):
    """The peer broke a MUST of the protocol (or vanished): drop the connection."""


@dataclass
class Export:
    """A named device served to clients.  ``writable`` is False when the device is read-only."""

    name: str
    device: BlockDevice
    description: str = ""
    writable: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.device.readonly:
            self.writable = False
        if len(self.name.encode()) > P.MAX_STRING:
            raise ValueError("export name longer than 4096 bytes")


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def block_sizes(device: BlockDevice, max_payload: int) -> tuple[int, int, int]:
    """(minimum, preferred, maximum) obeying "Size constraints" (powers of two, bounds)."""
    minimum, preferred, maximum = getattr(device, "block_size", (1, 4096, DEFAULT_MAX_PAYLOAD))
    minimum = min(_pow2_floor(minimum), 65536)
    preferred = max(_pow2_floor(preferred), minimum, 512)
    maximum = max(min(maximum, max_payload), preferred)
    return minimum, preferred, maximum


class NBDServer:
    """Serves exports on any number of listening sockets.  Start with one of the ``start_*`` methods."""

    def __init__(
        self,
        exports: Iterable[Export] | Mapping[str, BlockDevice],
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        workers: int = DEFAULT_WORKERS,
        threads: int | None = None,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        handshake_timeout: float = 60.0,
        send_timeout: float = 120.0,
        idle_timeout: float | None = None,
    ):
        if isinstance(exports, Mapping):
            exports = [Export(name, dev, writable=not dev.readonly) for name, dev in exports.items()]
        self.exports: list[Export] = list(exports)
        if not self.exports:
            raise ValueError("no exports")
        names = [e.name for e in self.exports]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate export names: {names}")
        self.max_payload = max_payload
        self.max_inflight = max_inflight
        self.workers = max(1, workers)
        self.tls = tls
        self.tls_required = tls_required and tls is not None
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        #: A connection with no request for this long is dropped (None: never).
        self.idle_timeout = idle_timeout if idle_timeout is not None else 20.0 * 86400  # poll() takes int ms
        self.executor = ThreadPoolExecutor(max_workers=threads or 8, thread_name_prefix="nbd-io")
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task] = set()
        self.addresses: list[Any] = []

    # -- exports -------------------------------------------------------------------

    def find_export(self, name: str) -> Export | None:
        """The export called ``name``; the empty name is the default (first) export."""
        for exp in self.exports:
            if exp.name == name:
                return exp
        if name == "":
            return self.exports[0]
        return None

    # -- listening -----------------------------------------------------------------

    async def start_unix(self, path: str) -> None:
        srv = await asyncio.start_unix_server(self._client, path=path, limit=MAX_OPTION_LENGTH)
        self._servers.append(srv)
        self.addresses.append(path)

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> int:
        """Listen on TCP; returns the port (useful with ``port=0``)."""
        srv = await asyncio.start_server(self._client, host=host, port=port, limit=MAX_OPTION_LENGTH)
        self._servers.append(srv)
        port = srv.sockets[0].getsockname()[1]
        self.addresses.append((host, port))
        return port

    async def start_socket(self, sock: socket.socket) -> None:
        """Serve on an already listening socket (systemd socket activation)."""
        if sock.family == socket.AF_UNIX:
            srv = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_OPTION_LENGTH)
        else:
            srv = await asyncio.start_server(self._client, sock=sock, limit=MAX_OPTION_LENGTH)
        self._servers.append(srv)
        self.addresses.append(sock.getsockname())

    async def serve_forever(self) -> None:
        await asyncio.gather(*(srv.serve_forever() for srv in self._servers))

    async def close(self) -> None:
        """Stop listening, end every connection (in-flight requests finish first)."""
        for srv in self._servers:
            srv.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        for srv in self._servers:
            await srv.wait_closed()
        self.executor.shutdown(wait=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        conn = _Connection(self, reader, writer)
        try:
            await conn.run()
        except asyncio.CancelledError:
            # server shutdown: asyncio's stream callback must not see a cancelled task
            writer.transport.abort()
        finally:
            self._connections.discard(task)


class _Handles:
    """Device handles of one connection: one clone per thread that works for it (made on
    first use, kept by that thread), or the export's own device under the export's lock
    when it cannot (or must not) be cloned."""

    def __init__(self, server: NBDServer, export: Export):
        self.export = export
        self.lock = threading.Lock()
        self.local = threading.local()
        self.all: list[BlockDevice] = []
        # A writable device whose clones do not share a cache must not be written
        # through several handles at once: every connection uses the one device.
        self.shared = export.writable and not export.device.can_multi_conn

    def run(self, fn, *args):
        """``fn(device, *args)`` on this thread's handle (called from worker threads)."""
        dev = getattr(self.local, "dev", None)
        if dev is None and not self.shared:
            try:
                dev = self.export.device.clone()
            except ImageFormatError:
                self.shared = True
            else:
                with self.lock:
                    self.all.append(dev)
                self.local.dev = dev
        if dev is None:
            with self.export.lock:
                return fn(self.export.device, *args)
        return fn(dev, *args)

    def close(self) -> None:
        """Close every clone (after the last request of the connection has finished)."""
        with self.lock:
            devs, self.all = self.all, []
        for dev in devs:
            try:
                dev.close()
            except Exception:  # closing a clone must not take the server down
                log.exception("closing a device handle")


def _set_kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """SO_RCVTIMEO / SO_SNDTIMEO: a blocked recv or send fails with EAGAIN after ``seconds``."""
    whole = int(min(seconds, 2**31 - 1))
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", whole, int((seconds - whole) * 1e6)))


@dataclass(frozen=True)
class _FileSpan:
    """Reply bytes to be sent straight from a file with sendfile(): ``length`` bytes of ``fd`` at ``offset``."""

    fd: int
    offset: int
    length: int


def _send_parts(sock: socket.socket, parts: list) -> None:
    """Send the buffers and _FileSpans of ``parts`` in order on a blocking socket: runs of
    buffers in as few sendmsg() calls as the socket allows, spans by sendfile()."""
    views: list[memoryview] = []
    for part in [*parts, None]:
        if part is not None and not isinstance(part, _FileSpan):
            views.append(memoryview(part).cast("B"))
            continue
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]
        if part is not None:
            offset, left = part.offset, part.length
            while left:
                n = os.sendfile(sock.fileno(), part.fd, offset, left)
                if n == 0:  # the file is shorter than the device says: the reply cannot be completed
                    raise OSError(errno.EIO, f"file ended at {offset} while sending a reply")
                offset += n
                left -= n


def _error_of(exc: BaseException) -> tuple[int, str]:
    """(NBD error value, message) for an exception raised by a device."""
    if isinstance(exc, ImageFormatError):
        return P.nbd_error(getattr(exc, "errno", errno.EIO)), str(exc)
    if isinstance(exc, OSError):
        return P.nbd_error(exc.errno), exc.strerror or "I/O error"
    log.error("unexpected error from a device", exc_info=exc)
    return P.NBD_EIO, f"internal error: {type(exc).__name__}"


class _Connection:
    def __init__(self, server: NBDServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tls_active = False
        self.no_zeroes = False
        self._reset_options()
        self.export: Export | None = None
        self.handles: _Handles | None = None
        self.tasks: set[asyncio.Task] = set()
        self.sem = asyncio.Semaphore(server.max_inflight)
        self.tx_lock = threading.Lock()
        self.scratch = threading.local()  # per worker thread read buffer (thread mode)
        self.write_bytes = 0  # WRITE payload bytes held (bounded by WRITE_BUDGET)
        self.write_cond = threading.Condition()
        self.write_acond = asyncio.Condition()
        self.dead = False

    def _reset_options(self) -> None:
        self.structured = False
        self.meta_export: Export | None = None  # export named by the last SET_META_CONTEXT
        self.meta_selected = False

    # -- plumbing --------------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            raise _HardDisconnect("client went away") from exc

    async def _discard(self, n: int) -> None:
        while n > 0:
            chunk = await self._read(min(n, MiB))
            n -= len(chunk)

    async def _drain(self) -> None:
        if self.dead:
            raise _HardDisconnect("client went away")
        try:
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError) as exc:
            self.dead = True
            raise _HardDisconnect("client went away") from exc

    def _send(self, *parts) -> None:
        if self.dead or self.writer.is_closing():
            self.dead = True
            raise _HardDisconnect("client went away")
        for part in parts:
            self.writer.write(part)

    async def run(self) -> None:
        peer = self.writer.get_extra_info("peername") or "unix client"
        try:
            try:
                export = await asyncio.wait_for(self._negotiate(), self.server.handshake_timeout)
            except asyncio.TimeoutError:
                raise _HardDisconnect("handshake timed out") from None
            if export is not None:
                await self._transmission(export)
        except _HardDisconnect as exc:
            log.debug("%s: %s", peer, exc)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: connection failed", peer)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        # In-flight requests run in threads on this connection's handles: let them end first.
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.handles is not None:
            self.handles.close()
        for name in ("rx", "tx"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close()
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except (Exception, asyncio.CancelledError):
            self.writer.transport.abort()

    # -- handshake ("Fixed newstyle negotiation") ---------------------------------------

    async def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._send(P.OPTION_REPLY.pack(P.REPLY_MAGIC, opt, rtype, len(data)), data)
        await self._drain()

    async def _opt_error(self, opt: int, rtype: int, message: str) -> None:
        await self._opt_reply(opt, rtype, message.encode()[: P.MAX_STRING])

    async def _negotiate(self) -> Export | None:
        self._send(P.HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES))
        await self._drain()
        (cflags,) = P.CLIENT_FLAGS.unpack(await self._read(4))
        # "Client flags": the server MUST drop the connection on an unknown flag.
        if cflags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES):
            raise _HardDisconnect(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & P.NBD_FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPTION_HEADER.unpack(await self._read(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise _HardDisconnect(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                if length > DISCARD_LIMIT:
                    raise _HardDisconnect(f"option payload of {length} bytes")
                await self._discard(length)
                await self._opt_error(opt, P.NBD_REP_ERR_TOO_BIG, f"option payload of {length} bytes is too large")
                continue
            data = await self._read(length)
            if self.server.tls_required and not self.tls_active and opt not in (P.NBD_OPT_STARTTLS, P.NBD_OPT_ABORT):
                # "FORCEDTLS mode"
                if opt == P.NBD_OPT_EXPORT_NAME:
                    raise _HardDisconnect("NBD_OPT_EXPORT_NAME before TLS")
                await self._opt_error(opt, P.NBD_REP_ERR_TLS_REQD, "TLS is required")
                continue
            if opt == P.NBD_OPT_EXPORT_NAME:
                return await self._opt_export_name(data)
            if opt in (P.NBD_OPT_GO, P.NBD_OPT_INFO):
                export = await self._opt_info(opt, data)
                if export is not None and opt == P.NBD_OPT_GO:
                    return export
            elif opt == P.NBD_OPT_ABORT:
                # "NBD_OPT_ABORT": reply ACK; the client may already have gone.
                try:
                    await self._opt_reply(opt, P.NBD_REP_ACK)
                except _HardDisconnect:
                    pass
                return None
            elif opt == P.NBD_OPT_LIST:
                await self._opt_list(opt, data)
            elif opt == P.NBD_OPT_STARTTLS:
                await self._opt_starttls(opt, data)
            elif opt == P.NBD_OPT_STRUCTURED_REPLY:
                if data:
                    await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                else:
                    self.structured = True
                    await self._opt_reply(opt, P.NBD_REP_ACK)
            elif opt in (P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT):
                await self._opt_meta(opt, data)
            else:
                await self._opt_error(opt, P.NBD_REP_ERR_UNSUP, f"option {opt} is not supported")

    def _tflags(self, export: Export) -> int:
        """Transmission flags for ``export`` ("Transmission flags")."""
        dev = export.device
        flags = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_CACHE
        if export.writable:
            flags |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO
        else:
            flags |= P.NBD_FLAG_READ_ONLY
        if self.structured:
            flags |= P.NBD_FLAG_SEND_DF
        # Read-only exports have nothing to keep coherent; writable ones only if the device says so.
        if not export.writable or dev.can_multi_conn:
            flags |= P.NBD_FLAG_CAN_MULTI_CONN
        return flags

    async def _opt_export_name(self, data: bytes) -> Export | None:
        # "NBD_OPT_EXPORT_NAME": an unknown export MUST terminate the session.
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _HardDisconnect("export name is not UTF-8") from None
        export = self.server.find_export(name)
        if export is None:
            raise _HardDisconnect(f"unknown export {name!r}")
        reply = P.EXPORT_NAME_REPLY.pack(export.device.size, self._tflags(export))
        self._send(reply, b"" if self.no_zeroes else bytes(124))
        await self._drain()
        return export

    async def _opt_info(self, opt: int, data: bytes) -> Export | None:
        # "NBD_OPT_INFO (6) and NBD_OPT_GO (7)"
        if len(data) < 6:
            await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "option data too short")
            return None
        (nlen,) = P.U32.unpack_from(data, 0)
        if nlen > len(data) - 6:
            await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "export name length runs past the option")
            return None
        (nreq,) = P.U16.unpack_from(data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * nreq:
            await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "information request list has the wrong length")
            return None
        try:
            name = data[4 : 4 + nlen].decode("utf-8")
        except UnicodeDecodeError:
            await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "export name is not UTF-8")
            return None
        requests = set(struct.unpack_from(f">{nreq}H", data, 6 + nlen))
        export = self.server.find_export(name)
        if export is None:
            await self._opt_error(opt, P.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        dev = export.device
        await self._opt_reply(opt, P.NBD_REP_INFO, P.INFO_EXPORT.pack(P.NBD_INFO_EXPORT, dev.size, self._tflags(export)))
        # NBD_INFO_BLOCK_SIZE is always sent: the client ignores what it did not ask for.
        mn, pref, mx = block_sizes(dev, self.server.max_payload)
        await self._opt_reply(opt, P.NBD_REP_INFO, P.INFO_BLOCK_SIZE.pack(P.NBD_INFO_BLOCK_SIZE, mn, pref, mx))
        if P.NBD_INFO_NAME in requests:
            await self._opt_reply(opt, P.NBD_REP_INFO, P.U16.pack(P.NBD_INFO_NAME) + export.name.encode())
        if P.NBD_INFO_DESCRIPTION in requests and export.description:
            desc = export.description.encode()[: P.MAX_STRING]
            await self._opt_reply(opt, P.NBD_REP_INFO, P.U16.pack(P.NBD_INFO_DESCRIPTION) + desc)
        await self._opt_reply(opt, P.NBD_REP_ACK)
        return export

    async def _opt_list(self, opt: int, data: bytes) -> None:
        # "NBD_OPT_LIST"
        if data:
            await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for exp in self.server.exports:
            name = exp.name.encode()
            await self._opt_reply(opt, P.NBD_REP_SERVER, P.U32.pack(len(name)) + name + exp.description.encode()[:P.MAX_STRING])
        await self._opt_reply(opt, P.NBD_REP_ACK)

    async def _opt_starttls(self, opt: int, data: bytes) -> None:
        # "NBD_OPT_STARTTLS"; "NOTLS mode" answers NBD_REP_ERR_UNSUP.
        if self.server.tls is None:
            await self._opt_error(opt, P.NBD_REP_ERR_UNSUP, "TLS is not enabled on this server")
            return
        if data or self.tls_active:
            await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "bad NBD_OPT_STARTTLS")
            return
        await self._opt_reply(opt, P.NBD_REP_ACK)
        try:
            await self.writer.start_tls(self.server.tls)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            raise _HardDisconnect(f"TLS handshake failed: {exc}") from None
        self.tls_active = True
        # "the server MUST NOT preserve any negotiation state ... issued before this command"
        self._reset_options()

    @staticmethod
    def _parse_meta(data: bytes) -> tuple[str, list[str]] | None:
        """(export name, queries) of a *_META_CONTEXT option, or None when malformed."""
        try:
            (nlen,) = P.U32.unpack_from(data, 0)
            pos = 4 + nlen
            if pos + 4 > len(data):
                return None
            name = data[4:pos].decode("utf-8")
            (count,) = P.U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = P.U32.unpack_from(data, pos)
                pos += 4
                if pos + qlen > len(data):
                    return None
                queries.append(data[pos : pos + qlen].decode("utf-8"))
                pos += qlen
            if pos != len(data):
                return None
            return name, queries
        except (struct.error, UnicodeDecodeError):
            return None

    async def _opt_meta(self, opt: int, data: bytes) -> None:
        # "NBD_OPT_LIST_META_CONTEXT" / "NBD_OPT_SET_META_CONTEXT"; "Metadata querying"
        setting = opt == P.NBD_OPT_SET_META_CONTEXT
        if setting:
            self.meta_export, self.meta_selected = None, False  # replaced even when this fails
            if not self.structured:
                await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "negotiate structured replies first")
                return
        parsed = self._parse_meta(data)
        if parsed is None:
            await self._opt_error(opt, P.NBD_REP_ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        export = self.server.find_export(name)
        if export is None:
            await self._opt_error(opt, P.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if setting:
            chosen = P.BASE_ALLOCATION in queries
        else:
            chosen = not queries or any(q in ("base:", P.BASE_ALLOCATION) for q in queries)
        if chosen:
            ctx_id = META_CONTEXT_ID if setting else 0
            await self._opt_reply(opt, P.NBD_REP_META_CONTEXT, P.U32.pack(ctx_id) + P.BASE_ALLOCATION.encode())
        if setting:
            self.meta_export, self.meta_selected = export, chosen
        await self._opt_reply(opt, P.NBD_REP_ACK)

    # -- transmission ("Transmission", "Request types") --------------------------------
    #
    # Requests are processed by _process() in a thread: validation, the device call and
    # the reply, built as a list of buffers.  On plain connections the whole transmission
    # phase runs on threads (nbdkit-style): one reader thread parses requests from a
    # duplicate of the socket, a few worker threads per connection process them and send
    # each reply whole under a lock.  TLS connections stay on asyncio (the SSL state lives
    # in the transport) and run _process() in the shared thread pool.

    async def _transmission(self, export: Export) -> None:
        self.export = export
        self.handles = _Handles(self.server, export)
        self.block_status_ok = self.meta_selected and self.meta_export is export
        self.payload_max = block_sizes(export.device, self.server.max_payload)[2]
        sock = self.writer.get_extra_info("socket")
        if self.tls_active or sock is None:
            await self._transmission_async()
        else:
            await self._transmission_threads(sock)

    # ---- asyncio mode (TLS) ----

    async def _transmission_async(self) -> None:
        while True:
            header = await self._read(P.REQUEST.size)
            magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(header)
            if magic != P.NBD_REQUEST_MAGIC:
                raise _HardDisconnect(f"bad request magic {magic:#x}")
            if cmd == P.NBD_CMD_DISC:
                # "Terminating the transmission phase": finish in-flight requests, then close.
                return
            payload = None
            if cmd == P.NBD_CMD_WRITE:
                if length > self.payload_max:
                    # "Size constraints": the client MUST NOT; skip the payload and refuse.
                    if length > DISCARD_LIMIT:
                        raise _HardDisconnect(f"write payload of {length} bytes")
                    await self._discard(length)
                    payload = _TOO_BIG
                else:
                    async with self.write_acond:
                        await self.write_acond.wait_for(
                            lambda: self.write_bytes == 0 or self.write_bytes + length <= WRITE_BUDGET)
                        self.write_bytes += length
                    payload = await self._read(length)
            await self._acquire()
            self._spawn(self._request_async((flags, cmd, cookie, offset, length, payload)))

    async def _acquire(self) -> None:
        await self.sem.acquire()
        if self.dead:
            self.sem.release()
            raise _HardDisconnect("client went away")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            self.sem.release()
            if not t.cancelled() and t.exception() is not None and not isinstance(t.exception(), _HardDisconnect):
                log.error("request failed", exc_info=t.exception())

        task.add_done_callback(done)

    async def _request_async(self, request) -> None:
        loop = asyncio.get_running_loop()
        try:
            parts = await loop.run_in_executor(self.server.executor, self._process, *request)
        finally:
            if request[1] == P.NBD_CMD_WRITE and isinstance(request[5], (bytes, bytearray)):
                async with self.write_acond:
                    self.write_bytes -= request[4]
                    self.write_acond.notify_all()
        self._send(*parts)
        await self._drain()

    # ---- thread mode (plain connections) ----

    async def _transmission_threads(self, sock) -> None:
        # Bytes the StreamReader already buffered belong to the first requests.
        buffered = getattr(self.reader, "_buffer", None)
        leftover = bytes(buffered) if buffered else b""
        if buffered:
            buffered.clear()
        self.writer.transport.pause_reading()
        # Blocking sockets with kernel timeouts: Python's own timeouts poll() before every
        # recv and send, which costs a syscall and a GIL hand-off per call.
        self.rx = socket.socket(fileno=os.dup(sock.fileno()))
        self.rx.settimeout(None)
        _set_kernel_timeout(self.rx, socket.SO_RCVTIMEO, self.server.idle_timeout)
        self.tx = socket.socket(fileno=os.dup(sock.fileno()))
        self.tx.settimeout(None)
        _set_kernel_timeout(self.tx, socket.SO_SNDTIMEO, self.server.send_timeout)
        self.leftover = leftover
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def target() -> None:
            try:
                self._reader_thread()
            except Exception:
                log.exception("connection thread failed")
            finally:
                try:
                    loop.call_soon_threadsafe(finished.set_result, None)
                except RuntimeError:  # the loop is gone (interpreter shutdown)
                    pass

        threading.Thread(target=target, name="nbd-conn", daemon=True).start()
        try:
            await asyncio.shield(finished)
        except asyncio.CancelledError:
            self._kill_sockets()  # server shutdown: wake the reader, fail the senders
            await finished
            raise

    def _kill_sockets(self) -> None:
        self.dead = True
        for s in (getattr(self, "rx", None), getattr(self, "tx", None)):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        if self.leftover:
            take = self.leftover[:n]
            view[: len(take)] = take
            self.leftover = self.leftover[len(take):]
            got = len(take)
        while got < n:
            try:
                k = self.rx.recv_into(view[got:])
            except OSError as exc:
                raise _HardDisconnect(f"client went away ({exc})") from None
            if not k:
                raise _HardDisconnect("client went away")
            got += k
        return buf

    def _reader_thread(self) -> None:
        q: queue.SimpleQueue = queue.SimpleQueue()
        # One token per request allowed in flight (a C queue: cheaper than threading.Semaphore).
        inflight: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.server.max_inflight):
            inflight.put(None)
        self.work_queue, self.inflight = q, inflight
        self.workers: list[threading.Thread] = []
        self.workers_lock = threading.Lock()
        self._add_worker()
        try:
            while True:
                magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(self._recv_exact(P.REQUEST.size))
                if magic != P.NBD_REQUEST_MAGIC:
                    raise _HardDisconnect(f"bad request magic {magic:#x}")
                if cmd == P.NBD_CMD_DISC:
                    return  # in-flight requests finish below
                payload = None
                if cmd == P.NBD_CMD_WRITE:
                    if length > self.payload_max:
                        # "Size constraints": the client MUST NOT; skip the payload and refuse.
                        if length > DISCARD_LIMIT:
                            raise _HardDisconnect(f"write payload of {length} bytes")
                        left = length
                        while left:
                            left -= len(self._recv_exact(min(left, MiB)))
                        payload = _TOO_BIG
                    else:
                        with self.write_cond:
                            self.write_cond.wait_for(
                                lambda: self.write_bytes == 0 or self.write_bytes + length <= WRITE_BUDGET)
                            self.write_bytes += length
                        payload = self._recv_exact(length)
                inflight.get()
                if self.dead:
                    return
                q.put((flags, cmd, cookie, offset, length, payload))
        except _HardDisconnect as exc:
            log.debug("%s", exc)
            self._kill_sockets()
        finally:
            with self.workers_lock:
                workers, self.workers = self.workers, None  # None: no more workers may start
            for _ in workers:
                q.put(None)
            for w in workers:
                w.join()

    def _add_worker(self) -> None:
        """Start one more worker thread for this connection, up to the server's ``workers``.

        A connection starts with one: Python threads that take turns with the GIL through
        many short C calls slow each other down, so fast devices (files, LUKS) are served
        best by one thread per connection.  A request that keeps its worker busy for longer
        than SLOW_REQUEST (a block decode, a network round trip) adds another, so requests
        that would be fast need not wait behind slow ones.
        """
        with self.workers_lock:
            if self.workers is None or len(self.workers) >= self.server.workers:
                return
            worker = threading.Thread(target=self._worker, args=(self.work_queue, self.inflight),
                                      name="nbd-worker", daemon=True)
            self.workers.append(worker)
            worker.start()

    def _worker(self, q: queue.SimpleQueue, inflight: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            try:
                try:
                    started = time.monotonic()
                    parts = self._process(*item)
                    if time.monotonic() - started > SLOW_REQUEST:
                        self._add_worker()
                finally:
                    if item[1] == P.NBD_CMD_WRITE and isinstance(item[5], (bytes, bytearray)):
                        with self.write_cond:
                            self.write_bytes -= item[4]
                            self.write_cond.notify_all()
                self._tx_send(parts)
            except _HardDisconnect:
                pass
            except Exception:
                log.exception("request failed")
            finally:
                inflight.put(None)

    def _tx_send(self, parts) -> None:
        """Send one whole reply from a worker thread."""
        with self.tx_lock:
            if self.dead:
                raise _HardDisconnect("client went away")
            try:
                _send_parts(self.tx, parts)
            except OSError as exc:  # reset, broken pipe, or the send deadline passed
                self._kill_sockets()
                raise _HardDisconnect(f"client went away ({exc})") from None

    # -- replies ---------------------------------------------------------------------

    def _ok_parts(self, cookie: int) -> list:
        if self.structured:
            return [P.STRUCTURED_REPLY.pack(P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                                            P.NBD_REPLY_TYPE_NONE, cookie, 0)]
        return [P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, cookie)]

    def _error_parts(self, cookie: int, error: int, message: str) -> list:
        if self.structured:
            # "NBD_REPLY_TYPE_ERROR": error, message length, message
            msg = message.encode("utf-8", "replace")[: P.MAX_STRING]
            payload = P.ERROR_CHUNK.pack(error, len(msg)) + msg
            return [P.STRUCTURED_REPLY.pack(P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                                            P.NBD_REPLY_TYPE_ERROR, cookie, len(payload)) + payload]
        return [P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, error, cookie)]

    # -- commands (run on a thread) -----------------------------------------------------

    def _process(self, flags: int, cmd: int, cookie: int, offset: int, length: int, payload) -> list:
        """Validate and run one request; returns the reply as buffers to send in order."""
        export = self.export
        size = export.device.size
        if payload is _TOO_BIG:
            return self._error_parts(cookie, P.NBD_EINVAL,
                                     f"write of {length} bytes exceeds the {self.payload_max}-byte maximum")
        if cmd not in P.VALID_CMD_FLAGS:
            return self._error_parts(cookie, P.NBD_EINVAL, f"unknown command {cmd}")
        # "Command flags": unknown or inapplicable flags are NBD_EINVAL.
        if flags & ~P.VALID_CMD_FLAGS[cmd] or (flags & P.NBD_CMD_FLAG_DF and not self.structured):
            return self._error_parts(cookie, P.NBD_EINVAL, f"invalid flags {flags:#x} for {P.CMD_NAMES[cmd]}")
        if flags & P.NBD_CMD_FLAG_FAST_ZERO and not export.writable:
            return self._error_parts(cookie, P.NBD_EINVAL, "fast zero was not advertised")
        if cmd in (P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES) and not export.writable:
            return self._error_parts(cookie, P.NBD_EPERM, "the export is read-only")
        if cmd != P.NBD_CMD_FLUSH and offset + length > size:
            # "Error values": ENOSPC for writes past the end, EINVAL otherwise.
            err = P.NBD_ENOSPC if cmd in (P.NBD_CMD_WRITE, P.NBD_CMD_WRITE_ZEROES) else P.NBD_EINVAL
            return self._error_parts(cookie, err, f"request [{offset}, {offset + length}) is beyond the {size}-byte export")
        run = self.handles.run
        fua = bool(flags & P.NBD_CMD_FLAG_FUA)
        try:
            if cmd == P.NBD_CMD_READ:
                return self._do_read(flags, cookie, offset, length)
            if cmd == P.NBD_CMD_BLOCK_STATUS:
                return self._do_block_status(flags, cookie, offset, length)
            if cmd == P.NBD_CMD_WRITE:
                if length:
                    run(lambda d: d.pwrite(payload, offset, fua=fua))
            elif cmd == P.NBD_CMD_FLUSH:
                run(lambda d: d.flush())
            elif cmd == P.NBD_CMD_TRIM:
                if length:
                    run(lambda d: (d.trim(length, offset), fua and d.flush()))
            elif cmd == P.NBD_CMD_WRITE_ZEROES:
                may_trim = not flags & P.NBD_CMD_FLAG_NO_HOLE
                fast = bool(flags & P.NBD_CMD_FLAG_FAST_ZERO)
                if length:
                    run(lambda d: (d.zero(length, offset, may_trim=may_trim, fast=fast), fua and d.flush()))
            elif cmd == P.NBD_CMD_CACHE:
                pass  # advisory ("NBD_CMD_CACHE"); success without effect is allowed
        except NotFastError as exc:
            # "NBD_CMD_FLAG_FAST_ZERO": fail quickly with NBD_ENOTSUP.
            return self._error_parts(cookie, P.NBD_ENOTSUP, str(exc))
        except Exception as exc:
            err, msg = _error_of(exc)
            if err == P.NBD_ENOTSUP and not isinstance(exc, UnsupportedFeatureError):
                err = P.NBD_EINVAL
            return self._error_parts(cookie, err, msg)
        return self._ok_parts(cookie)

    @staticmethod
    def _read_pieces(dev: BlockDevice, offset: int, length: int, use_extents: bool, scratch=None) -> list:
        """Read a range; returns ``[(offset, length, content)]`` covering it in order, where
        content is None for a hole, a memoryview of the bytes, or (thread mode only) a
        _FileSpan when the bytes lie verbatim in a file and can go out with sendfile(), or
        a view of the device's own memory (memory_range()) sent without a copy.

        ``scratch``: a thread-local holder whose buffer may be reused (thread mode, where
        the reply is sent before the worker takes its next request).
        """
        end = offset + length
        pieces: list[list] = []
        if use_extents and dev.can_extents:
            pos = offset
            for ext in dev.extents(length, offset):
                start, stop = max(ext.start, pos), min(ext.end, end)
                if stop <= start:
                    continue
                hole = ext.zero and stop - start >= MIN_HOLE_CHUNK and len(pieces) < MAX_READ_CHUNKS
                if pieces and (pieces[-1][2] == hole or (not hole and len(pieces) >= MAX_READ_CHUNKS)):
                    pieces[-1][1] += stop - start
                else:
                    pieces.append([start, stop - start, hole])
                pos = stop
                if pos >= end:
                    break
            if pos < end:  # extents ended early (should not happen): read the rest
                pieces.append([pos, end - pos, False])
        else:
            pieces.append([offset, length, False])
        out: list = []
        to_read: list = []
        for start, n, hole in pieces:
            if hole:
                out.append((start, n, None))
                continue
            in_file = in_memory = None
            if scratch is not None:  # thread mode: the reply goes out before these are dropped
                in_file = dev.file_range(n, start)
                if in_file is None:
                    in_memory = dev.memory_range(n, start)
            if in_file is not None:
                out.append((start, n, _FileSpan(in_file[0], in_file[1], n)))
            elif in_memory is not None:
                out.append((start, n, in_memory))
            else:
                out.append((start, n, b""))  # filled below
                to_read.append(len(out) - 1)
        need = sum(out[i][1] for i in to_read)
        if not need:
            return out
        if scratch is not None and need <= SCRATCH_MAX:
            buf = getattr(scratch, "buf", None)
            if buf is None or len(buf) < need:
                buf = scratch.buf = bytearray(max(need, 256 * 1024))
        else:
            buf = bytearray(need)
        view = memoryview(buf)
        at = 0
        for i in to_read:
            start, n, _ = out[i]
            dev.readinto(view[at : at + n], start)
            out[i] = (start, n, view[at : at + n])
            at += n
        return out

    def _do_read(self, flags: int, cookie: int, offset: int, length: int) -> list:
        if length > self.payload_max:
            err = P.NBD_EOVERFLOW if self.structured else P.NBD_EINVAL
            return self._error_parts(cookie, err, f"read of {length} bytes exceeds the {self.payload_max}-byte maximum")
        use_extents = self.structured and not flags & P.NBD_CMD_FLAG_DF
        scratch = self.scratch if threading.current_thread().name == "nbd-worker" else None
        pieces = self.handles.run(self._read_pieces, offset, length, use_extents, scratch)
        if not self.structured:
            # "Simple reply message" (no extents asked for: every piece is data)
            return [P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, cookie), *(c for _, _, c in pieces)]
        if length == 0:
            return self._ok_parts(cookie)
        # "NBD_REPLY_TYPE_OFFSET_DATA" / "NBD_REPLY_TYPE_OFFSET_HOLE"; all data is in hand,
        # so the last content chunk can carry NBD_REPLY_FLAG_DONE.
        parts: list = []
        last = len(pieces) - 1
        for i, (start, n, content) in enumerate(pieces):
            done = P.NBD_REPLY_FLAG_DONE if i == last else 0
            if content is None:
                parts.append(P.STRUCTURED_REPLY.pack(P.NBD_STRUCTURED_REPLY_MAGIC, done, P.NBD_REPLY_TYPE_OFFSET_HOLE,
                                                     cookie, P.OFFSET_HOLE.size) + P.OFFSET_HOLE.pack(start, n))
            else:
                parts.append(P.STRUCTURED_REPLY.pack(P.NBD_STRUCTURED_REPLY_MAGIC, done, P.NBD_REPLY_TYPE_OFFSET_DATA,
                                                     cookie, 8 + n) + P.U64.pack(start))
                parts.append(content)
        return parts

    @staticmethod
    def _extents(dev: BlockDevice, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        """(length, flags) descriptors for base:allocation, clipped to the request."""
        out: list[tuple[int, int]] = []
        end = offset + length
        for ext in dev.extents(length, offset, req_one=req_one):
            start, stop = max(ext.start, offset), min(ext.end, end)
            if stop <= start:
                continue
            state = (P.NBD_STATE_HOLE if ext.hole else 0) | (P.NBD_STATE_ZERO if ext.zero else 0)
            if out and out[-1][1] == state:
                out[-1] = (out[-1][0] + stop - start, state)
            else:
                out.append((stop - start, state))
            if stop >= end or req_one or len(out) >= MAX_BLOCK_STATUS_EXTENTS:
                break
        return out

    def _do_block_status(self, flags: int, cookie: int, offset: int, length: int) -> list:
        # "NBD_CMD_BLOCK_STATUS" for "`base:allocation` metadata context"
        if not self.block_status_ok:
            return self._error_parts(cookie, P.NBD_EINVAL, "no metadata context was selected")
        if length == 0:
            return self._error_parts(cookie, P.NBD_EINVAL, "block status of an empty range")
        req_one = bool(flags & P.NBD_CMD_FLAG_REQ_ONE)
        descs = self.handles.run(self._extents, offset, length, req_one) or [(length, 0)]
        payload = P.U32.pack(META_CONTEXT_ID) + b"".join(struct.pack(">II", n, s) for n, s in descs)
        return [P.STRUCTURED_REPLY.pack(P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                                        P.NBD_REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)) + payload]


# ---------------------------------------------------------------------------------
# TLS


def tls_context_x509(cert_dir: str, *, verify_peer: bool = False) -> ssl.SSLContext:
    """A server context from nbdkit/qemu-style files: ``server-cert.pem``, ``server-key.pem``
    and (for ``verify_peer``) ``ca-cert.pem`` in ``cert_dir``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # "TLS versions"
    ctx.load_cert_chain(os.path.join(cert_dir, "server-cert.pem"), os.path.join(cert_dir, "server-key.pem"))
    if verify_peer:
        ctx.load_verify_locations(os.path.join(cert_dir, "ca-cert.pem"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_context_psk(psk_file: str) -> ssl.SSLContext:
    """A server context for TLS-PSK from a GnuTLS psktool file (``username:hexkey`` lines).

    Needs Python 3.13 (``SSLContext.set_psk_server_callback``); older Pythons raise
    UnsupportedFeatureError.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if not hasattr(ctx, "set_psk_server_callback"):
        raise UnsupportedFeatureError("TLS-PSK needs Python 3.13 or later (ssl has no PSK support here)")
    keys: dict[str, bytes] = {}
    with open(psk_file, encoding="ascii") as f:
        for line in f:
            line = line.strip()
            if line:
                user, _, hexkey = line.partition(":")
                keys[user] = bytes.fromhex(hexkey)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # PSK callbacks apply to TLS 1.2 in CPython's ssl
    ctx.set_ciphers("PSK")
    ctx.set_psk_server_callback(lambda identity: keys.get(identity or "", b""))
    return ctx


__all__ = ["NBDServer", "Export", "block_sizes", "tls_context_x509", "tls_context_psk"]
