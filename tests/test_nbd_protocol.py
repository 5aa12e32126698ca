"""Protocol edge cases against the built-in NBD server, with a raw socket client.

The oracle for data is the bytes of the file written by dd/truncate (read with
plain Python file I/O), and the NBD spec (doc/proto.md) for error values.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time

import pytest

from imageformats.block import FileDevice, MemoryDevice
from imageformats.nbd import protocol as P
from imageformats.nbd.server import Export

from nbd_util import RawClient, ServerThread, wait_for


@pytest.fixture
def served(tmp_path, sparse_raw):
    """sparse_raw (16 MiB: data at 1 MiB and 8 MiB) read-only as 'ro', a writable 1 MiB file as 'rw'."""
    rw_path = tmp_path / "rw.raw"
    rw_path.write_bytes(os.urandom(1 << 20))
    ro = FileDevice(sparse_raw)
    rw = FileDevice(rw_path, writable=True)
    exports = [Export("ro", ro), Export("rw", rw, writable=True)]
    with ServerThread(exports, str(tmp_path / "nbd.sock"), max_payload=1 << 20) as srv:
        srv.ro_bytes = sparse_raw.read_bytes()
        srv.rw_path = rw_path
        yield srv
    ro.close()
    rw.close()


def client(srv) -> RawClient:
    c = RawClient(srv.sock_path)
    c.handshake()
    return c


def assert_server_alive(srv):
    c = client(srv)
    size, _ = c.go("ro")
    assert size == len(srv.ro_bytes)
    c.request(P.NBD_CMD_READ, 1 << 20, 4096, cookie=77)
    chunks = c.chunks()
    assert chunks[-1][1] == P.NBD_REPLY_TYPE_OFFSET_DATA
    assert chunks[-1][3][8:] == srv.ro_bytes[1 << 20 : (1 << 20) + 4096]
    c.close()


def test_handshake_flags_and_unknown_client_flags(served):
    c = RawClient(served.sock_path)
    hflags = c.handshake(cflags=P.NBD_FLAG_C_FIXED_NEWSTYLE | (1 << 7))
    assert hflags == P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES
    # "Client flags": the server MUST drop the connection on an unknown flag.
    assert c.closed_by_server()
    assert_server_alive(served)


def test_bad_option_magic_disconnects_and_server_stays_up(served):
    c = client(served)
    c.option(P.NBD_OPT_LIST, magic=0x1234567812345678)
    assert c.closed_by_server()
    assert_server_alive(served)


def test_unknown_option_then_go(served):
    c = client(served)
    c.option(99, b"junk")
    opt, rtype, _ = c.opt_reply()
    assert (opt, rtype) == (99, P.NBD_REP_ERR_UNSUP)
    c.option(P.NBD_OPT_EXTENDED_HEADERS)
    assert c.opt_reply()[1] == P.NBD_REP_ERR_UNSUP
    c.option(P.NBD_OPT_STARTTLS)  # no TLS configured: "NOTLS mode"
    assert c.opt_reply()[1] == P.NBD_REP_ERR_UNSUP
    size, flags = c.go("ro")
    assert size == 16 << 20
    assert flags & P.NBD_FLAG_READ_ONLY and flags & P.NBD_FLAG_CAN_MULTI_CONN


def test_list_info_and_meta_context(served):
    c = client(served)
    c.option(P.NBD_OPT_LIST)
    reps = c.replies_until_final()
    names = [d[4 : 4 + struct.unpack_from(">I", d)[0]].decode() for t, d in reps if t == P.NBD_REP_SERVER]
    assert names == ["ro", "rw"]
    c.option(P.NBD_OPT_LIST, b"x")
    assert c.opt_reply()[1] == P.NBD_REP_ERR_INVALID
    # unknown export
    c.option(P.NBD_OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert c.opt_reply()[1] == P.NBD_REP_ERR_UNKNOWN
    # name length running past the option data
    c.option(P.NBD_OPT_GO, struct.pack(">I", 100) + b"ro" + struct.pack(">H", 0))
    assert c.opt_reply()[1] == P.NBD_REP_ERR_INVALID
    # INFO on rw with NAME and BLOCK_SIZE requested
    c.option(P.NBD_OPT_INFO, struct.pack(">I", 2) + b"rw" + struct.pack(">HHH", 2, P.NBD_INFO_NAME, P.NBD_INFO_BLOCK_SIZE))
    infos = {struct.unpack_from(">H", d)[0]: d for t, d in c.replies_until_final() if t == P.NBD_REP_INFO}
    _, size, flags = P.INFO_EXPORT.unpack(infos[P.NBD_INFO_EXPORT])
    assert size == 1 << 20 and not flags & P.NBD_FLAG_READ_ONLY
    assert flags & P.NBD_FLAG_SEND_WRITE_ZEROES and flags & P.NBD_FLAG_SEND_FAST_ZERO and flags & P.NBD_FLAG_SEND_TRIM
    assert infos[P.NBD_INFO_NAME][2:] == b"rw"
    _, mn, pref, mx = P.INFO_BLOCK_SIZE.unpack(infos[P.NBD_INFO_BLOCK_SIZE])
    assert mn == 1 and pref == 4096 and mx == 1 << 20
    # SET_META_CONTEXT before structured replies is invalid
    q = b"base:allocation"
    meta = struct.pack(">I", 2) + b"ro" + struct.pack(">II", 1, len(q)) + q
    c.option(P.NBD_OPT_SET_META_CONTEXT, meta)
    assert c.opt_reply()[1] == P.NBD_REP_ERR_INVALID
    # LIST_META_CONTEXT with the "base:" wildcard and an unknown namespace
    lq = [b"base:", b"qemu:dirty-bitmap:x"]
    body = struct.pack(">I", 2) + b"ro" + struct.pack(">I", 2) + b"".join(struct.pack(">I", len(x)) + x for x in lq)
    c.option(P.NBD_OPT_LIST_META_CONTEXT, body)
    reps = c.replies_until_final()
    assert [(t, d[4:]) for t, d in reps] == [(P.NBD_REP_META_CONTEXT, q), (P.NBD_REP_ACK, b"")]
    # truncated query list
    c.option(P.NBD_OPT_LIST_META_CONTEXT, struct.pack(">I", 2) + b"ro" + struct.pack(">II", 1, 50) + b"base:")
    assert c.opt_reply()[1] == P.NBD_REP_ERR_INVALID
    c.option(P.NBD_OPT_ABORT)
    assert c.opt_reply()[1] == P.NBD_REP_ACK
    assert c.closed_by_server()


def test_oversized_option_is_refused_and_skipped(served):
    c = client(served)
    c.option(P.NBD_OPT_GO, bytes(200_000))
    assert c.opt_reply()[1] == P.NBD_REP_ERR_TOO_BIG
    assert c.go("ro")[0] == 16 << 20


def test_export_name_with_and_without_zeroes(served):
    for cflags, pad in ((P.NBD_FLAG_C_FIXED_NEWSTYLE, 124), (P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES, 0)):
        c = RawClient(served.sock_path)
        c.handshake(cflags)
        c.option(P.NBD_OPT_EXPORT_NAME, b"rw")
        size, flags = P.EXPORT_NAME_REPLY.unpack(c.recv(10))
        assert size == 1 << 20 and flags & P.NBD_FLAG_HAS_FLAGS
        if pad:
            assert c.recv(pad) == bytes(pad)
        c.request(P.NBD_CMD_READ, 4096, 512, cookie=5)  # no structured replies: simple reply
        err, cookie, data = c.simple_reply(512)
        assert (err, cookie) == (0, 5)
        assert data == served.rw_path.read_bytes()[4096:4608]
        c.request(P.NBD_CMD_DISC)
        assert c.closed_by_server()
    c = RawClient(served.sock_path)
    c.handshake()
    c.option(P.NBD_OPT_EXPORT_NAME, b"missing")  # MUST terminate the session
    assert c.closed_by_server()


def test_simple_reply_errors(served):
    c = client(served)
    c.go("ro", structured=False, meta=False)
    c.request(P.NBD_CMD_READ, (16 << 20) - 100, 512, cookie=1)
    assert c.simple_reply()[:2] == (P.NBD_EINVAL, 1)
    c.request(P.NBD_CMD_READ, 0, 2 << 20, cookie=2)  # beyond the advertised 1 MiB maximum
    assert c.simple_reply()[:2] == (P.NBD_EINVAL, 2)
    c.request(P.NBD_CMD_WRITE, 0, 4, cookie=3, data=b"abcd")
    assert c.simple_reply()[:2] == (P.NBD_EPERM, 3)
    c.request(P.NBD_CMD_WRITE_ZEROES, 0, 4096, cookie=4)
    assert c.simple_reply()[:2] == (P.NBD_EPERM, 4)
    c.request(42, 0, 0, cookie=5)
    assert c.simple_reply()[:2] == (P.NBD_EINVAL, 5)
    c.request(P.NBD_CMD_READ, 0, 512, flags=P.NBD_CMD_FLAG_REQ_ONE, cookie=6)
    assert c.simple_reply()[:2] == (P.NBD_EINVAL, 6)
    c.request(P.NBD_CMD_BLOCK_STATUS, 0, 512, cookie=7)  # no meta context selected
    assert c.simple_reply()[:2] == (P.NBD_EINVAL, 7)
    c.request(P.NBD_CMD_FLUSH, cookie=8)
    assert c.simple_reply()[:2] == (0, 8)
    c.request(P.NBD_CMD_READ, 8 << 20, 4096, cookie=9)
    assert c.simple_reply(4096) == (0, 9, served.ro_bytes[8 << 20 : (8 << 20) + 4096])


def test_structured_read_uses_holes_and_errors(served):
    c = client(served)
    c.go("ro")
    data = served.ro_bytes
    # [0.5 MiB, 1.5 MiB): hole, then 64 KiB of data at 1 MiB, then hole
    off, n = 512 << 10, 1 << 20
    c.request(P.NBD_CMD_READ, off, n, cookie=11)
    chunks = c.chunks()
    assert all(ck[2] == 11 for ck in chunks)
    got = bytearray(n)
    covered = 0
    kinds = []
    for flags, rtype, _, payload in chunks:
        if rtype == P.NBD_REPLY_TYPE_OFFSET_DATA:
            (start,) = struct.unpack_from(">Q", payload)
            got[start - off : start - off + len(payload) - 8] = payload[8:]
            covered += len(payload) - 8
            kinds.append("data")
        elif rtype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
            start, hlen = P.OFFSET_HOLE.unpack(payload)
            covered += hlen
            kinds.append("hole")
    assert covered == n
    assert bytes(got) == data[off : off + n]
    assert kinds == ["hole", "data", "hole"]
    # DF: one content chunk only
    c.request(P.NBD_CMD_READ, off, n, flags=P.NBD_CMD_FLAG_DF, cookie=12)
    chunks = c.chunks()
    assert len(chunks) == 1 and chunks[0][1] == P.NBD_REPLY_TYPE_OFFSET_DATA
    assert chunks[0][3][8:] == data[off : off + n]
    # too large for the advertised maximum: EOVERFLOW ("NBD_CMD_READ", structured)
    c.request(P.NBD_CMD_READ, 0, 2 << 20, cookie=13)
    assert c.error_of(c.chunks()) == P.NBD_EOVERFLOW
    # past the end
    c.request(P.NBD_CMD_READ, 16 << 20, 1, cookie=14)
    chunks = c.chunks()
    assert c.error_of(chunks) == P.NBD_EINVAL and chunks[0][1] == P.NBD_REPLY_TYPE_ERROR
    msg_len = struct.unpack_from(">H", chunks[0][3], 4)[0]
    assert b"beyond" in chunks[0][3][6 : 6 + msg_len]


@pytest.mark.parametrize("structured", [True, False])
def test_file_shrunk_under_the_server_is_never_wrong_data(tmp_path, structured):
    """Reads of a raw file go out with sendfile(); when the file turns out shorter than the
    export, the client must see an error or a dropped connection, never a reply padded or
    cut short.  Before the truncation the bytes are the file's."""
    path = tmp_path / "shrinks.raw"
    data = os.urandom(2 << 20)
    path.write_bytes(data)
    dev = FileDevice(path)
    with ServerThread([Export("f", dev)], str(tmp_path / "nbd.sock")) as srv:
        c = RawClient(srv.sock_path)
        c.handshake()
        c.go("f", structured=structured, meta=False)

        def read(offset, n, cookie):
            c.request(P.NBD_CMD_READ, offset, n, cookie=cookie)
            if structured:
                chunks = c.chunks()
                if c.error_of(chunks):
                    return None
                assert [ck[1] for ck in chunks] == [P.NBD_REPLY_TYPE_OFFSET_DATA]
                return chunks[0][3][8:]
            error, _, payload = c.simple_reply(n)
            return None if error else payload

        assert read(1 << 20, 256 << 10, 1) == data[1 << 20 : (1 << 20) + (256 << 10)]
        os.truncate(path, 1 << 20)
        try:
            got = read((1 << 20) - 4096, 8192, 2)
        except (EOFError, ConnectionError):
            got = "dropped"
        assert got in (None, "dropped"), "bytes past the end of a shrunk file were served as data"
        c.close()
    dev.close()


class _SlowDevice(MemoryDevice):
    """Reads take 30 ms (an xz Block decode, an HTTP round trip)."""

    def _readinto(self, buf, offset):
        time.sleep(0.03)
        super()._readinto(buf, offset)

    def clone(self):
        return _SlowDevice(self.data, writable=False)


@pytest.mark.parametrize("slow", [False, True])
def test_workers_grow_only_for_slow_requests(tmp_path, slow):
    """One worker per connection serves fast devices (more threads only fight over the GIL);
    requests slower than 10 ms make the connection add workers, up to the limit."""
    data = os.urandom(1 << 20)
    dev = (_SlowDevice if slow else MemoryDevice)(data, writable=False)
    with ServerThread([Export("d", dev)], str(tmp_path / "nbd.sock"), workers=3) as srv:
        c = RawClient(srv.sock_path)
        c.handshake()
        c.go("d")
        for i in range(12):  # pipelined
            c.request(P.NBD_CMD_READ, i * 4096, 4096, cookie=100 + i)
        replies = {}
        for _ in range(12):
            chunks = c.chunks()
            replies[chunks[0][2]] = b"".join(ck[3][8:] for ck in chunks)
        assert replies == {100 + i: data[i * 4096 : (i + 1) * 4096] for i in range(12)}
        workers = sum(t.name == "nbd-worker" for t in threading.enumerate())
        assert workers == (3 if slow else 1)
        c.close()


def test_block_status_req_one(served):
    c = client(served)
    c.go("ro")
    c.request(P.NBD_CMD_BLOCK_STATUS, 0, 16 << 20, cookie=21)
    (chunk,) = c.chunks()
    assert chunk[1] == P.NBD_REPLY_TYPE_BLOCK_STATUS
    ctx, = struct.unpack_from(">I", chunk[3])
    descs = [struct.unpack_from(">II", chunk[3], 4 + 8 * i) for i in range((len(chunk[3]) - 4) // 8)]
    H = P.NBD_STATE_HOLE | P.NBD_STATE_ZERO
    assert descs == [(1 << 20, H), (64 << 10, 0), ((7 << 20) - (64 << 10), H), (1 << 20, 0), (7 << 20, H)]
    c.request(P.NBD_CMD_BLOCK_STATUS, 4096, 16 << 20, cookie=22)  # past the end
    assert c.error_of(c.chunks()) == P.NBD_EINVAL
    c.request(P.NBD_CMD_BLOCK_STATUS, 4096, 8 << 20, flags=P.NBD_CMD_FLAG_REQ_ONE, cookie=23)
    (chunk,) = c.chunks()
    assert (len(chunk[3]) - 4) // 8 == 1
    assert struct.unpack_from(">II", chunk[3], 4) == ((1 << 20) - 4096, H)
    c.request(P.NBD_CMD_BLOCK_STATUS, 1 << 20, 4096, flags=P.NBD_CMD_FLAG_REQ_ONE, cookie=24)
    (chunk,) = c.chunks()
    assert struct.unpack_from(">II", chunk[3], 4) == (4096, 0)  # never longer than the request


def test_writes_zero_trim_and_limits(served):
    c = client(served)
    size, flags = c.go("rw")
    model = bytearray(served.rw_path.read_bytes())
    payload = os.urandom(8192)
    c.request(P.NBD_CMD_WRITE, 4096, len(payload), flags=P.NBD_CMD_FLAG_FUA, cookie=31, data=payload)
    assert c.error_of(c.chunks()) == 0
    model[4096 : 4096 + 8192] = payload
    c.request(P.NBD_CMD_WRITE_ZEROES, 65536, 65536, flags=P.NBD_CMD_FLAG_NO_HOLE, cookie=32)
    assert c.error_of(c.chunks()) == 0
    model[65536:131072] = bytes(65536)
    c.request(P.NBD_CMD_WRITE_ZEROES, 131072, 65536, flags=P.NBD_CMD_FLAG_FAST_ZERO, cookie=33)
    assert c.error_of(c.chunks()) == 0  # fallocate on a file is fast
    model[131072:196608] = bytes(65536)
    c.request(P.NBD_CMD_WRITE, size - 2, 4, cookie=34, data=b"wxyz")  # past the end: ENOSPC
    assert c.error_of(c.chunks()) == P.NBD_ENOSPC
    # a payload over the maximum is read and discarded, then refused; the stream stays in sync
    big = bytes(2 << 20)
    c.request(P.NBD_CMD_WRITE, 0, len(big), cookie=35, data=big)
    assert c.error_of(c.chunks()) == P.NBD_EINVAL
    c.request(P.NBD_CMD_TRIM, 0, 4096, flags=P.NBD_CMD_FLAG_NO_HOLE, cookie=36)  # flag not valid for TRIM
    assert c.error_of(c.chunks()) == P.NBD_EINVAL
    c.request(P.NBD_CMD_FLUSH, cookie=37)
    assert c.error_of(c.chunks()) == 0
    c.request(P.NBD_CMD_DISC)
    assert c.closed_by_server()
    assert served.rw_path.read_bytes() == bytes(model)


def test_fast_zero_not_fast_is_enotsup(tmp_path):
    class SlowZeroDevice(MemoryDevice):
        """A memory device whose zero falls back to writing (BlockDevice's generic _zero)."""

        _zero = MemoryDevice.__mro__[1]._zero

        def clone(self):
            return SlowZeroDevice(self.data)

    dev = SlowZeroDevice(bytearray(os.urandom(65536)))
    with ServerThread([Export("m", dev, writable=True)], str(tmp_path / "s")) as srv:
        c = client(srv)
        c.go("m")
        c.request(P.NBD_CMD_WRITE_ZEROES, 0, 4096, flags=P.NBD_CMD_FLAG_FAST_ZERO, cookie=1)
        assert c.error_of(c.chunks()) == P.NBD_ENOTSUP
        assert dev.data[:4096] != bytes(4096)  # "SHOULD NOT alter the contents"
        c.request(P.NBD_CMD_WRITE_ZEROES, 0, 4096, cookie=2)
        assert c.error_of(c.chunks()) == 0
        assert dev.data[:4096] == bytes(4096)


def test_bad_request_magic_and_vanishing_clients(served):
    c = client(served)
    c.go("ro")
    c.request(P.NBD_CMD_READ, 0, 512, magic=0xDEADBEEF)
    assert c.closed_by_server()
    # a client that sends a big read and goes away before the reply
    for _ in range(5):
        c = client(served)
        c.go("ro")
        for i in range(8):
            c.request(P.NBD_CMD_READ, 0, 1 << 20, cookie=i)
        c.close()
    # a client that dies in the middle of a write payload
    c = client(served)
    c.go("rw")
    c.sock.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, 1, 0, 65536) + bytes(1000))
    c.close()
    # a client that dies during the handshake
    c = RawClient(served.sock_path)
    c.recv(10)
    c.close()
    assert wait_for(lambda: served.connections() == 0)
    assert_server_alive(served)


def test_many_clients_at_once(served):
    data = served.ro_bytes
    errors = []

    def worker(seed):
        try:
            rnd = random.Random(seed)
            c = client(served)
            c.go("ro")
            pending = {}
            for cookie in range(20):
                off = rnd.randrange(0, len(data) - 65536)
                n = rnd.randrange(1, 65536)
                pending[cookie] = (off, n)
                c.request(P.NBD_CMD_READ, off, n, cookie=cookie)
            got = {}
            while len(got) < len(pending):
                chunks = c.chunks()
                cookie = chunks[0][2]
                off, n = pending[cookie]
                buf = bytearray(n)
                for _, rtype, _, payload in chunks:
                    if rtype == P.NBD_REPLY_TYPE_OFFSET_DATA:
                        (start,) = struct.unpack_from(">Q", payload)
                        buf[start - off : start - off + len(payload) - 8] = payload[8:]
                got[cookie] = bytes(buf)
            for cookie, (off, n) in pending.items():
                assert got[cookie] == data[off : off + n], (seed, cookie)
            c.request(P.NBD_CMD_DISC)
            c.close()
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]


def test_handshake_timeout_and_shutdown_with_live_clients(tmp_path, sparse_raw):
    dev = FileDevice(sparse_raw)
    srv = ServerThread([Export("d", dev)], str(tmp_path / "s"), handshake_timeout=0.5)
    with srv:
        slow = RawClient(srv.sock_path)
        slow.recv(P.HANDSHAKE.size)  # ...and never answers
        assert slow.closed_by_server()  # dropped after the handshake timeout
        busy = client(srv)
        busy.go("d")
        busy.request(P.NBD_CMD_READ, 0, 4096, cookie=1)
        assert busy.chunks()[-1][2] == 1
        idle = client(srv)  # stuck in option haggling when the server stops
    # leaving the block closed the server with both clients still connected
    assert busy.closed_by_server() and idle.closed_by_server()
    dev.close()


def test_pipelined_writes_beyond_the_memory_budget(served, monkeypatch):
    import imageformats.nbd.server as server_mod

    monkeypatch.setattr(server_mod, "WRITE_BUDGET", 256 * 1024)  # 4 writes of 64 KiB held at most
    c = client(served)
    c.go("rw")
    model = bytearray(served.rw_path.read_bytes())
    blobs = []
    for i in range(16):  # 1 MiB pipelined without reading a reply
        data = os.urandom(65536)
        blobs.append(data)
        c.request(P.NBD_CMD_WRITE, i * 65536, 65536, cookie=100 + i, data=data)
        model[i * 65536 : (i + 1) * 65536] = data
    cookies = set()
    for _ in range(16):
        chunks = c.chunks()
        assert c.error_of(chunks) == 0
        cookies.add(chunks[0][2])
    assert cookies == set(range(100, 116))
    c.request(P.NBD_CMD_FLUSH, cookie=1)
    assert c.error_of(c.chunks()) == 0
    assert served.rw_path.read_bytes() == bytes(model)
