"""HttpDevice: a read-only device over HTTP(S) range requests (nbdkit's curl plugin, in Python).

    dev = HttpDevice("http://127.0.0.1:8080/disk.qcow2.xz")
    imageformats.open("https://example.com/disk.qcow2.xz")   # registered for http and https

* size from ``HEAD`` (Content-Length), or from ``Content-Range`` of a one-byte ranged GET
  when HEAD is refused or has no length;
* reads are ``GET`` with ``Range: bytes=A-B`` (RFC 9110 section 14); a server that answers
  200 (the whole file) instead of 206 cannot be used for random access and is reported as
  such, as are 404 and other permanent statuses;
* a small thread-safe pool of persistent ``http.client`` connections shared by clones;
* transient failures (connection errors, timeouts, 408/429/500/502/503/504) are retried
  with exponential backoff;
* a bounded LRU cache of aligned blocks serves small reads (probing, table lookups);
  large reads go straight into the caller's buffer.
The query string of a URL (often a signed token) is never shown in messages or ``info``.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Any

from .block import BlockDevice
from .detect import register_source
from .errors import (
    DeviceIOError,
    ImageFormatError,
    InvalidArgumentError,
    OutOfRangeError,
    UnsupportedFeatureError,
)

KiB = 1024
MiB = 1024 * KiB

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
USER_AGENT = "imageformats-http/1"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)


class _Transient(Exception):
    """A failure worth retrying."""


def redact(url: str) -> str:
    """``scheme://host/path`` without credentials or query (which may hold tokens)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class _Pool:
    """Idle persistent connections to one origin; thread-safe."""

    def __init__(self, url: str, size: int, timeout: float, ssl_context: ssl.SSLContext | None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise InvalidArgumentError(f"unsupported URL scheme {parts.scheme!r}")
        if not parts.hostname:
            raise InvalidArgumentError(f"URL {redact(url)!r} has no host")
        self.scheme = parts.scheme
        self.host = parts.hostname
        try:
            self.port = parts.port
        except ValueError:
            raise InvalidArgumentError(f"URL {redact(url)!r} has a bad port") from None
        self.size = size
        self.timeout = timeout
        self.ssl_context = ssl_context
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def get(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self.scheme == "https":
            ctx = self.ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Shared:
    """State shared by an HttpDevice and its clones: URL, pool, block cache."""

    def __init__(self, url, pool, retries, backoff, cache_block, cache_blocks):
        self.url = url
        self.display = redact(url)
        self.pool = pool
        self.retries = retries
        self.backoff = backoff
        self.cache_block = cache_block
        self.cache_blocks = cache_blocks
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.cache_lock = threading.Lock()
        self.refs = 1
        self.refs_lock = threading.Lock()
        self.requests = 0  # GET/HEAD requests sent (for tests and benchmarks)

    @property
    def target(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))


class HttpDevice(BlockDevice):
    """Read-only random access to a file on an HTTP(S) server that honours Range requests."""

    format_name = "http"
    readonly = True
    can_multi_conn = True
    can_zero = False

    def __init__(
        self,
        url: str,
        *,
        retries: int = 4,
        backoff: float = 0.1,
        timeout: float = 30.0,
        pool_size: int = 4,
        cache_block: int = 256 * KiB,
        cache_blocks: int = 64,
        ssl_context: ssl.SSLContext | None = None,
        _shared: _Shared | None = None,
        _size: int | None = None,
    ):
        if _shared is not None:
            self._s = _shared
            self.size = _size
            return
        if cache_block <= 0 or cache_blocks < 0 or retries < 0:
            raise InvalidArgumentError("bad HttpDevice cache or retry settings")
        pool = _Pool(url, pool_size, timeout, ssl_context)
        self._s = _Shared(url, pool, retries, backoff, cache_block, cache_blocks)
        try:
            self.size = self._probe_size()
        except BaseException:
            pool.close()
            raise

    # -- requests --------------------------------------------------------------------

    def _with_retries(self, what: str, fn):
        s = self._s
        delay = s.backoff
        last: Exception | None = None
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(min(delay, 5.0))
                delay *= 2
            conn = s.pool.get()
            try:
                s.requests += 1
                result = fn(conn)
            except ImageFormatError:
                conn.close()
                raise
            except (_Transient, OSError, http.client.HTTPException) as exc:
                conn.close()
                last = exc
                continue
            except BaseException:
                conn.close()
                raise
            s.pool.put(conn)
            return result
        raise DeviceIOError(f"{what} {s.display} failed after {s.retries + 1} attempts: {last}")

    def _send(self, conn, method: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        conn.request(method, self._s.target, headers={"User-Agent": USER_AGENT, **headers})
        resp = conn.getresponse()
        if resp.status in REDIRECT_STATUS:
            location = resp.getheader("Location")
            resp.read()
            raise _Redirect(location)
        if resp.status in TRANSIENT_STATUS:
            resp.read()
            raise _Transient(f"HTTP {resp.status} {resp.reason}")
        if resp.status == 404:
            resp.read()
            raise InvalidArgumentError(f"{self._s.display}: not found (HTTP 404)")
        if resp.status in (401, 403):
            resp.read()
            raise DeviceIOError(f"{self._s.display}: access denied (HTTP {resp.status} {resp.reason})")
        return resp

    def _follow(self, fn):
        """Run ``fn`` with retries, following redirects (the pool moves to the new origin)."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                return self._with_retries("request to", fn)
            except _Redirect as red:
                if not red.location:
                    raise DeviceIOError(f"{self._s.display}: redirect without a Location") from None
                new = urllib.parse.urljoin(self._s.url, red.location)
                old = self._s.pool
                self._s.pool = _Pool(new, old.size, old.timeout, old.ssl_context)
                old.close()
                self._s.url = new
                self._s.display = redact(new)
        raise DeviceIOError(f"{self._s.display}: too many redirects")

    def _probe_size(self) -> int:
        def head(conn):
            resp = self._send(conn, "HEAD", {})
            resp.read()
            if resp.status == 200 and resp.getheader("Content-Length", "").isdigit():
                return int(resp.getheader("Content-Length"))
            if resp.status in (200, 405, 501):
                return None  # no usable length, or HEAD not allowed: ask with a range
            raise DeviceIOError(f"{self._s.display}: HTTP {resp.status} {resp.reason}")

        size = self._follow(head)
        if size is not None:
            return size

        def first_byte(conn):
            resp = self._send(conn, "GET", {"Range": "bytes=0-0"})
            if resp.status == 206:
                resp.read()
                m = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
                if m and m.group(3) != "*":
                    return int(m.group(3))
                raise DeviceIOError(f"{self._s.display}: the server does not say how large the file is")
            if resp.status == 416:  # an empty file
                resp.read()
                return 0
            resp.close()
            conn.close()
            if resp.status == 200:
                raise UnsupportedFeatureError(
                    f"{self._s.display}: the server ignored the Range header (200 instead of 206); "
                    "it cannot serve random access")
            raise DeviceIOError(f"{self._s.display}: HTTP {resp.status} {resp.reason}")

        return self._follow(first_byte)

    def _fetch(self, view: memoryview, offset: int) -> None:
        """GET ``[offset, offset+len(view))`` into ``view``."""
        n = len(view)
        last = offset + n - 1

        def get(conn):
            resp = self._send(conn, "GET", {"Range": f"bytes={offset}-{last}"})
            if resp.status == 200:
                resp.close()
                conn.close()
                raise UnsupportedFeatureError(
                    f"{self._s.display}: the server ignored the Range header (200 instead of 206); "
                    "it cannot serve random access")
            if resp.status == 416:
                resp.read()
                raise OutOfRangeError(f"{self._s.display}: range {offset}-{last} not satisfiable (the file shrank?)")
            if resp.status != 206:
                resp.read()
                raise DeviceIOError(f"{self._s.display}: HTTP {resp.status} {resp.reason}")
            m = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
            if not m or int(m.group(1)) != offset or int(m.group(2)) != last:
                resp.close()
                conn.close()
                raise DeviceIOError(f"{self._s.display}: asked for bytes {offset}-{last}, "
                                    f"got {resp.getheader('Content-Range')!r}")
            got = 0
            while got < n:
                k = resp.readinto(view[got:])
                if not k:
                    raise _Transient(f"connection closed after {got} of {n} bytes")
                got += k
            resp.read()  # let the connection be reused
            return None

        self._follow(get)

    # -- the contract -----------------------------------------------------------------

    def _readinto(self, buf: memoryview, offset: int) -> None:
        s = self._s
        bs = s.cache_block
        if len(buf) >= 2 * bs or s.cache_blocks == 0:
            self._fetch(buf, offset)
            return
        first, last = offset // bs, (offset + len(buf) - 1) // bs
        blocks: dict[int, bytes] = {}
        with s.cache_lock:
            for b in range(first, last + 1):
                data = s.cache.get(b)
                if data is not None:
                    s.cache.move_to_end(b)
                    blocks[b] = data
        b = first
        while b <= last:
            if b in blocks:
                b += 1
                continue
            run_end = b
            while run_end + 1 <= last and run_end + 1 not in blocks:
                run_end += 1
            start = b * bs
            stop = min((run_end + 1) * bs, self.size)
            tmp = bytearray(stop - start)
            self._fetch(memoryview(tmp), start)
            with s.cache_lock:
                for i in range(b, run_end + 1):
                    piece = bytes(tmp[(i - b) * bs : (i - b + 1) * bs])
                    blocks[i] = piece
                    s.cache[i] = piece
                    s.cache.move_to_end(i)
                while len(s.cache) > s.cache_blocks:
                    s.cache.popitem(last=False)
            b = run_end + 1
        pos = 0
        for i in range(first, last + 1):
            data = blocks[i]
            lo = offset + pos - i * bs
            take = min(len(data) - lo, len(buf) - pos)
            buf[pos : pos + take] = data[lo : lo + take]
            pos += take

    def clone(self) -> "HttpDevice":
        self._check_open()
        with self._s.refs_lock:
            self._s.refs += 1
        return HttpDevice(self._s.url, _shared=self._s, _size=self.size)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._s.refs_lock:
            self._s.refs -= 1
            last = self._s.refs == 0
        if last:
            self._s.pool.close()
            with self._s.cache_lock:
                self._s.cache.clear()

    @property
    def requests(self) -> int:
        return self._s.requests

    def layer_info(self) -> dict[str, Any]:
        return {"url": self._s.display}

    def __repr__(self) -> str:
        return f"<HttpDevice {self._s.display} size={self.size}>"


class _Redirect(Exception):
    def __init__(self, location: str | None):
        super().__init__(location)
        self.location = location


def _open_url(url: str, options: dict[str, Any]) -> BlockDevice:
    return HttpDevice(url)


register_source("http", _open_url)
register_source("https", _open_url)

__all__ = ["HttpDevice", "redact"]
