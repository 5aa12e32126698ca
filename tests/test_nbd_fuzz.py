"""Property tests of the NBD server: random request sequences against a whole-buffer model,
and random option payloads that must never take the server down."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageformats.block import MemoryDevice
from imageformats.nbd import protocol as P
from imageformats.nbd.server import Export

from nbd_util import RawClient, ServerThread

SIZE = 256 * 1024

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 40_000), st.integers(0, 255), st.booleans()),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 70_000), st.booleans(), st.booleans()),
    st.tuples(st.just("read"), st.integers(0, SIZE - 1), st.integers(0, 70_000), st.booleans(), st.booleans()),
    st.tuples(st.just("status"), st.integers(0, SIZE - 1), st.integers(1, 70_000), st.booleans(), st.booleans()),
)


def read_reply(c: RawClient, structured: bool, off: int, n: int) -> tuple[int, bytes]:
    if not structured:
        err, _, data = c.simple_reply(n)
        return err, data
    buf = bytearray(n)
    err = 0
    for _, rtype, _, payload in c.chunks():
        if rtype == P.NBD_REPLY_TYPE_OFFSET_DATA:
            (start,) = struct.unpack_from(">Q", payload)
            assert off <= start and start + len(payload) - 8 <= off + n
            buf[start - off : start - off + len(payload) - 8] = payload[8:]
        elif rtype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
            start, hlen = P.OFFSET_HOLE.unpack(payload)
            assert off <= start and start + hlen <= off + n
            buf[start - off : start - off + hlen] = bytes(hlen)
        elif rtype & 0x8000:
            err = struct.unpack_from(">I", payload)[0]
    return err, bytes(buf)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=25), structured=st.booleans())
def test_random_requests_match_a_model(tmp_path, ops, structured):
    model = bytearray(os.urandom(SIZE))
    dev = MemoryDevice(bytearray(model))
    path = str(tmp_path / f"s{os.getpid()}-{id(ops)}")
    with ServerThread([Export("m", dev, writable=True)], path, max_payload=64 * 1024) as srv:
        c = RawClient(srv.sock_path)
        c.handshake()
        c.go("m", structured=structured, meta=structured)
        for cookie, (kind, off, n, a, b) in enumerate(ops):
            inside = off + n <= SIZE
            if kind == "write":
                data = bytes([a]) * n
                c.request(P.NBD_CMD_WRITE, off, n, flags=P.NBD_CMD_FLAG_FUA if b else 0, cookie=cookie, data=data)
                err = read_reply(c, structured, off, 0)[0] if structured else c.simple_reply()[0]
                if n > 64 * 1024:
                    assert err == P.NBD_EINVAL
                elif inside:
                    assert err == 0
                    model[off : off + n] = data
                else:
                    assert err == P.NBD_ENOSPC
            elif kind == "zero":
                flags = (P.NBD_CMD_FLAG_NO_HOLE if a else 0) | (P.NBD_CMD_FLAG_FAST_ZERO if b else 0)
                c.request(P.NBD_CMD_WRITE_ZEROES, off, n, flags=flags, cookie=cookie)
                err = read_reply(c, structured, off, 0)[0] if structured else c.simple_reply()[0]
                if inside:
                    assert err == 0  # a memory device zeroes fast
                    model[off : off + n] = bytes(n)
                else:
                    assert err == P.NBD_ENOSPC
            elif kind == "read":
                c.request(P.NBD_CMD_READ, off, n, cookie=cookie)
                if not inside or n > 64 * 1024:
                    err, _ = read_reply(c, structured, off, 0) if structured else (c.simple_reply()[0], b"")
                    assert err in (P.NBD_EINVAL, P.NBD_EOVERFLOW)
                else:
                    err, data = read_reply(c, structured, off, n)
                    assert err == 0 and data == bytes(model[off : off + n])
            else:
                c.request(P.NBD_CMD_BLOCK_STATUS, off, n, cookie=cookie, flags=P.NBD_CMD_FLAG_REQ_ONE if a else 0)
                if not structured:
                    assert c.simple_reply()[0] == P.NBD_EINVAL  # no meta context without structured replies
                    continue
                chunks = c.chunks()
                if not inside:
                    assert c.error_of(chunks) == P.NBD_EINVAL
                    continue
                payload = chunks[0][3]
                descs = [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]
                total = sum(d[0] for d in descs)
                assert 0 < total <= n and all(d[0] > 0 for d in descs)
                if a:
                    assert len(descs) == 1
                pos = off
                for length, state in descs:
                    if state & P.NBD_STATE_ZERO:
                        assert model[pos : pos + length] == bytes(length)
                    pos += length
        c.request(P.NBD_CMD_DISC)
        c.close()
    assert dev.data == model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=64)), min_size=1, max_size=6))
def test_random_options_never_break_the_server(tmp_path, options):
    dev = MemoryDevice(bytearray(4096), writable=False)
    path = str(tmp_path / f"o{os.getpid()}-{id(options)}")
    with ServerThread([Export("m", dev)], path, handshake_timeout=5) as srv:
        c = RawClient(srv.sock_path, timeout=5)
        c.handshake()
        for opt, data in options:
            if opt in (P.NBD_OPT_EXPORT_NAME, P.NBD_OPT_GO, P.NBD_OPT_ABORT):
                continue  # these may legitimately end the negotiation
            c.option(opt, data)
            reps = c.replies_until_final()
            final = reps[-1][0]
            assert final == P.NBD_REP_ACK or final & P.NBD_REP_FLAG_ERROR
        c.close()
        # whatever happened, a well-behaved client still gets the export
        c2 = RawClient(srv.sock_path)
        c2.handshake()
        assert c2.go("m")[0] == 4096
        c2.close()


def _valid_stream() -> bytes:
    """A whole well-formed client conversation: flags, options, GO, then READ, WRITE, BLOCK_STATUS, DISC."""
    nm = b"m"
    q = P.BASE_ALLOCATION.encode()
    out = P.CLIENT_FLAGS.pack(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)
    out += P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_STRUCTURED_REPLY, 0)
    meta = struct.pack(">I", len(nm)) + nm + struct.pack(">II", 1, len(q)) + q
    out += P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_SET_META_CONTEXT, len(meta)) + meta
    go = struct.pack(">I", len(nm)) + nm + struct.pack(">HH", 1, P.NBD_INFO_BLOCK_SIZE)
    out += P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_GO, len(go)) + go
    out += P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, 1, 512, 4096)
    out += P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, 2, 0, 512) + b"\x55" * 512
    out += P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_BLOCK_STATUS, 3, 0, 8192)
    out += P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_DISC, 4, 0, 0)
    return out


BOUNDARY32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFF0, 4096, 65536, 1 << 25]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(st.tuples(st.sampled_from(["flip", "word", "cut", "dup"]), st.integers(0, 10_000),
                               st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_client_streams_never_hang_or_write_a_readonly_export(tmp_path, muts):
    """Byte flips, 32-bit fields set to boundary values, truncations and duplicated runs of a whole
    client conversation, sent at once (then EOF): the server answers or closes within its handshake
    timeout, never writes to a read-only export, and still serves a well-behaved client afterwards."""
    import socket

    stream = bytearray(_valid_stream())
    for kind, pos, val in muts:
        if not stream:
            break
        pos %= len(stream)
        if kind == "flip":
            stream[pos] ^= 1 << (val & 7)
        elif kind == "word":
            pos -= pos % 4
            stream[pos:pos + 4] = BOUNDARY32[val % len(BOUNDARY32)].to_bytes(4, "big")
        elif kind == "cut":
            del stream[pos:]
        else:
            stream[pos:pos] = stream[pos:pos + val]
    content = bytes(range(256)) * 64
    dev = MemoryDevice(bytearray(content), writable=False)
    path = str(tmp_path / f"f{os.getpid()}-{id(muts)}")
    with ServerThread([Export("m", dev)], path, handshake_timeout=3) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(8)
        s.connect(path)
        try:
            s.sendall(bytes(stream))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # the server must finish (answer, then close) -- a timeout fails the test
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            s.close()
        assert bytes(dev.data) == content
        c = RawClient(srv.sock_path, timeout=5)
        c.handshake()
        assert c.go("m", structured=False, meta=False)[0] == len(content)
        c.request(P.NBD_CMD_READ, 100, 1000)
        err, _, data = c.simple_reply(1000)
        assert err == 0 and data == content[100:1100]
        c.close()
