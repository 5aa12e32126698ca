"""Helpers for the NBD tests: an in-process server thread, the CLI server, a raw protocol client."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from peers import stop_process

from imageformats.nbd import protocol as P
from imageformats.nbd.server import NBDServer

SYSTEM_PYTHON = "/usr/bin/python3"


class ServerThread:
    """An NBDServer on a Unix socket, run by an event loop in a background thread."""

    def __init__(self, exports, sock_path: str, **kwargs):
        self.sock_path = sock_path
        self.server = NBDServer(exports, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.start_unix(self.sock_path))
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10), "server did not start"
        return self

    def __exit__(self, *exc):
        fut = asyncio.run_coroutine_threadsafe(self.server.close(), self.loop)
        fut.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def uri(self, name: str = "") -> str:
        return f"nbd+unix:///{name}?socket={self.sock_path}"

    def connections(self) -> int:
        return len(self.server._connections)


@contextmanager
def serve_cli(*args, env=None):
    """``imageformats serve ARGS --print-uri``; yields (process, uri) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "imageformats", "serve", *map(str, args), "--print-uri"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    try:
        line = proc.stdout.readline().decode().strip()
        if not line:
            proc.wait(10)
            raise AssertionError(f"serve did not start: {proc.stderr.read().decode()}")
        yield proc, line
    finally:
        stop_process(proc, 20)


def system_python(code: str, *args, timeout=120) -> str:
    """Run ``code`` with the system python3 (which has python3-libnbd); returns stdout."""
    proc = subprocess.run([SYSTEM_PYTHON, "-c", code, *map(str, args)], capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"system python failed: {proc.stderr.decode()}")
    return proc.stdout.decode()


class RawClient:
    """Speaks NBD byte by byte, so tests can send what real clients never would."""

    def __init__(self, path: str, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self):
        self.sock.close()

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def handshake(self, cflags: int = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, hflags = P.HANDSHAKE.unpack(self.recv(P.HANDSHAKE.size))
        assert (magic, opt_magic) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(P.CLIENT_FLAGS.pack(cflags))
        return hflags

    def option(self, opt: int, data: bytes = b"", magic: int = P.IHAVEOPT) -> None:
        self.sock.sendall(P.OPTION_HEADER.pack(magic, opt, len(data)) + data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
        assert magic == P.REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def replies_until_final(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            _, rtype, data = self.opt_reply()
            out.append((rtype, data))
            if rtype == P.NBD_REP_ACK or rtype & P.NBD_REP_FLAG_ERROR:
                return out

    def go(self, name: str = "", *, structured: bool = True, meta: bool = True) -> tuple[int, int]:
        """Negotiate to transmission; returns (size, transmission flags)."""
        if structured:
            self.option(P.NBD_OPT_STRUCTURED_REPLY)
            assert self.opt_reply()[1] == P.NBD_REP_ACK
        if meta:
            q = P.BASE_ALLOCATION.encode()
            nm = name.encode()
            self.option(P.NBD_OPT_SET_META_CONTEXT,
                        struct.pack(">I", len(nm)) + nm + struct.pack(">II", 1, len(q)) + q)
            reps = self.replies_until_final()
            assert reps[-1][0] == P.NBD_REP_ACK, reps
        nm = name.encode()
        self.option(P.NBD_OPT_GO, struct.pack(">I", len(nm)) + nm + struct.pack(">HH", 1, P.NBD_INFO_BLOCK_SIZE))
        size = flags = None
        for rtype, data in self.replies_until_final():
            if rtype == P.NBD_REP_INFO and struct.unpack_from(">H", data)[0] == P.NBD_INFO_EXPORT:
                _, size, flags = P.INFO_EXPORT.unpack(data)
            elif rtype != P.NBD_REP_INFO and rtype != P.NBD_REP_ACK:
                raise AssertionError(f"GO failed: {rtype:#x} {data!r}")
        return size, flags

    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1,
                data: bytes = b"", magic: int = P.NBD_REQUEST_MAGIC) -> None:
        self.sock.sendall(P.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + data)

    def simple_reply(self, length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = P.SIMPLE_REPLY.unpack(self.recv(P.SIMPLE_REPLY.size))
        assert magic == P.NBD_SIMPLE_REPLY_MAGIC
        return error, cookie, self.recv(length) if error == 0 else b""

    def chunks(self) -> list[tuple[int, int, int, bytes]]:
        """All chunks of one structured reply: (flags, type, cookie, payload)."""
        out = []
        while True:
            magic, flags, rtype, cookie, length = P.STRUCTURED_REPLY.unpack(self.recv(P.STRUCTURED_REPLY.size))
            assert magic == P.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
            out.append((flags, rtype, cookie, self.recv(length)))
            if flags & P.NBD_REPLY_FLAG_DONE:
                return out

    def error_of(self, chunks) -> int:
        for _, rtype, _, payload in chunks:
            if rtype & 0x8000:
                return struct.unpack_from(">I", payload)[0]
        return 0


def wait_for(pred, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()
