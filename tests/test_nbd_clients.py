"""The built-in NBD server with real clients: qemu-img, nbdinfo, nbdcopy, libnbd (python3-libnbd).

Oracles: the served file's own bytes, qemu-img reading the image itself (qcow2),
and qemu-img map of the raw file for allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


from imageformats.block import FileDevice
from imageformats.nbd.server import Export
from imageformats.xz import XzDevice

from nbd_util import ServerThread, serve_cli, system_python
from luks_tools import qemu_create, qemu_write
from peers import qemu_extents_as_ours, qemu_img_map, run, sparse_file

IMAGEFORMATS = [sys.executable, "-m", "imageformats"]


def nbdinfo_map(uri: str) -> list[tuple[int, int, bool, bool]]:
    """nbdinfo --map --json -> merged (start, length, zero, hole)."""
    out = []
    for e in json.loads(run("nbdinfo", "--map", "--json", uri).stdout):
        item = (e["offset"], e["length"], bool(e["type"] & 2), bool(e["type"] & 1))
        if out and out[-1][0] + out[-1][1] == item[0] and out[-1][2:] == item[2:]:
            prev = out.pop()
            item = (prev[0], prev[1] + item[1], item[2], item[3])
        out.append(item)
    return out


def test_qemu_img_tcp_and_unix_uris(tmp_path, sparse_raw):
    b = tmp_path / "b.raw"
    b.write_bytes(os.urandom(3 << 20))
    with serve_cli(sparse_raw, b, "--port", "0", "--export", "first") as (proc, uri):
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/first")
        base = uri.rsplit("/", 1)[0]
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", sparse_raw, f"{base}/first")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", b, f"{base}/b.raw")
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"{base}/b.raw", tmp_path / "b.copy")
        assert (tmp_path / "b.copy").read_bytes() == b.read_bytes()
        listed = run("nbdinfo", "--list", "--json", base + "/").stdout
        assert sorted(e["export-name"] for e in json.loads(listed)["exports"]) == ["b.raw", "first"]
    sock = tmp_path / "s.sock"
    with serve_cli(sparse_raw, "--socket", sock) as (proc, uri):
        assert uri == f"nbd+unix:///sparse.raw?socket={sock}"
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", sparse_raw, uri)
        # the empty name is the default export
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", sparse_raw, f"nbd+unix:///?socket={sock}")
        # qemu-img map over NBD (block status) matches qemu-img map of the file
        theirs = qemu_extents_as_ours(json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout))
        assert [(s, n, z) for s, n, z, _ in theirs] == [(s, n, z) for s, n, z, _ in
                                                         qemu_extents_as_ours(qemu_img_map(sparse_raw, "raw"))]


def test_nbdinfo_map_json_can(tmp_path, sparse_raw):
    with serve_cli(sparse_raw, "--socket", tmp_path / "s") as (proc, uri):
        assert nbdinfo_map(uri) == qemu_extents_as_ours(qemu_img_map(sparse_raw, "raw"))
        info = json.loads(run("nbdinfo", "--json", uri).stdout)
        exp = info["exports"][0]
        assert exp["export-size"] == 16 << 20
        assert exp["is_read_only"] is True and exp["can_multi_conn"] is True
        assert exp["block_size_preferred"] == 4096
        assert "base:allocation" in exp["contexts"]
        # nbdinfo --can exits 0 for yes, 2 for no
        assert run("nbdinfo", "--can", "read", uri, check=False).returncode == 0
        assert run("nbdinfo", "--can", "write", uri, check=False).returncode == 2
        assert run("nbdinfo", "--is", "read-only", uri, check=False).returncode == 0
        assert run("nbdinfo", "--can", "df", uri, check=False).returncode == 0
    rw = tmp_path / "rw.raw"
    rw.write_bytes(bytes(1 << 20))
    with serve_cli(rw, "--socket", tmp_path / "w", "--writable") as (proc, uri):
        for feature in ("write", "trim", "zero", "fast-zero", "fua", "flush", "multi-conn", "structured-reply"):
            assert run("nbdinfo", "--can", feature, uri, check=False).returncode == 0, feature


def test_nbdcopy_captive_server_socket_activation(tmp_path, sparse_raw):
    out = tmp_path / "out.raw"
    run("nbdcopy", "--", "[", *IMAGEFORMATS, "serve", sparse_raw, "]", out)
    assert out.read_bytes() == sparse_raw.read_bytes()
    # the copy stays sparse: holes were skipped (read as NBD_REPLY_TYPE_OFFSET_HOLE / block status)
    assert os.stat(out).st_blocks * 512 <= 2 << 20


def test_nbdcopy_into_writable_server_and_run(tmp_path):
    src = tmp_path / "src.raw"
    sparse_file(src, 8 << 20, [(3 << 20, 1 << 20), (7 << 20, 12345)])
    dst = tmp_path / "dst.raw"
    dst.write_bytes(os.urandom(8 << 20))  # garbage that must be overwritten / zeroed
    proc = subprocess.run([*IMAGEFORMATS, "serve", dst, "--writable", "--run", f'nbdcopy {src} "$uri"'],
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert dst.read_bytes() == src.read_bytes()
    # --run exits with the command's status and sets $uri, $nbd, $exportname
    proc = subprocess.run([*IMAGEFORMATS, "serve", src, "--run",
                           'test "$uri" = "$nbd" && test "$exportname" = src.raw && exit 7'], capture_output=True)
    assert proc.returncode == 7, proc.stderr


LIBNBD_SCRIPT = r"""
import errno, json, os, sys
import nbd
sock, path = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_export_name("disk")
h.connect_unix(sock)
out = {}
size = h.get_size()
out["size"] = size
out["read"] = h.pread(65536, 1 << 20).hex()
h.pwrite(b"\xab" * 8192, 2 << 20)
h.zero(65536, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 4 << 20)
h.flush()
out["after"] = h.pread(8192, 2 << 20).hex()
exts = []
def cb(metacontext, offset, entries, err):
    exts.append((metacontext, offset, list(entries)))
h.block_status(size, 0, cb)
h.block_status(size, 0, cb, nbd.CMD_FLAG_REQ_ONE)
out["exts"] = exts
h.set_strict_mode(0)  # let the out-of-range request reach the server
try:
    h.pread(4096, size)
except nbd.Error as e:
    out["oob_errno"] = e.errno
h.shutdown()
# captive server through socket activation
h2 = nbd.NBD()
h2.connect_systemd_socket_activation(sys.argv[3:])
out["activated_size"] = h2.get_size()
out["activated_read"] = h2.pread(4096, 8 << 20).hex()
h2.shutdown()
print(json.dumps(out))
"""


def test_libnbd_python(tmp_path, sparse_raw):
    path = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(sparse_raw), str(path)], check=True)
    model = bytearray(path.read_bytes())
    dev = FileDevice(path, writable=True)
    with ServerThread([Export("disk", dev, writable=True)], str(tmp_path / "sock")) as srv:
        out = json.loads(system_python(LIBNBD_SCRIPT, srv.sock_path, path, *IMAGEFORMATS, "serve", sparse_raw))
    dev.close()
    assert out["size"] == 16 << 20
    assert bytes.fromhex(out["read"]) == bytes(model[1 << 20 : (1 << 20) + 65536])
    assert bytes.fromhex(out["after"]) == b"\xab" * 8192
    model[2 << 20 : (2 << 20) + 8192] = b"\xab" * 8192
    model[3 << 20 : (3 << 20) + 65536] = bytes(65536)
    model[4 << 20 : 5 << 20] = bytes(1 << 20)
    assert path.read_bytes() == bytes(model)
    (ctx, off, full), (ctx1, off1, one) = out["exts"]
    assert ctx == ctx1 == "base:allocation" and off == off1 == 0
    assert sum(full[0::2]) == 16 << 20
    assert len(one) == 2 and one == full[:2]  # REQ_ONE: exactly the first extent
    # the file's own allocation (SEEK_HOLE) as the oracle for the first extent
    fd = os.open(path, os.O_RDONLY)
    first_data, first_hole = os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE)
    os.close(fd)
    assert one == ([first_data, 3] if first_data else [first_hole, 0])
    assert out["oob_errno"] in (22, "EINVAL")
    assert out["activated_size"] == 16 << 20
    assert bytes.fromhex(out["activated_read"]) == sparse_raw.read_bytes()[8 << 20 : (8 << 20) + 4096]


def test_qcow2_image_served(tmp_path):
    """A qcow2 made by qemu-img, served by us and compared by qemu-img reading the file itself."""
    raw = tmp_path / "d.raw"
    sparse_file(raw, 6 << 20, [(1 << 20, 300_000), (5 << 20, 4096)])
    qcow = tmp_path / "d.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    with serve_cli(qcow, "--socket", tmp_path / "s") as (proc, uri):
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow, uri)
        info = json.loads(run("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["export-size"] == 6 << 20


def test_sparse_random_through_nbdcopy(tmp_path):
    """nbdcopy from our server (sparse-random source) into our server (verifying sparse-random target)."""
    src = "sparse-random://64M?seed=5&percent=5&runlength=256K"
    with serve_cli(src, "--socket", tmp_path / "a", "--export", "src") as (_, a), \
            serve_cli(src + "&verify=1", "--socket", tmp_path / "b", "--export", "dst", "--writable") as (_, b), \
            serve_cli(src.replace("seed=5", "seed=6"), "--socket", tmp_path / "c", "--export", "other") as (_, c):
        run("nbdcopy", "--flush", a, b)
        # the verifying target refuses other content: the check can fail
        assert run("nbdcopy", c, b, check=False).returncode != 0
        out = tmp_path / "out.raw"
        run("nbdcopy", a, out)
        # nbdinfo --map from the server equals the allocation nbdcopy produced in the sparse output file
        data = [(s, n) for s, n, z, h in nbdinfo_map(a) if not z]
        assert data, "sparse-random produced no data islands"
        blob = out.read_bytes()
        for s, n in data:
            assert blob[s : s + n].count(0) < n  # islands are random, not zero
        mask = bytearray(len(blob))
        for s, n in data:
            mask[s : s + n] = b"\x01" * n
        zero_parts = [blob[i : i + 4096] for i in range(0, len(blob), 4096) if not any(mask[i : i + 4096])]
        assert all(p == bytes(len(p)) for p in zero_parts)


def test_luks_and_xz_stacks_served(tmp_path):
    """LUKS1 made by qemu-img and a multi-block xz made by xz, served; the real tools are the oracle."""
    raw = tmp_path / "g.raw"
    sparse_file(raw, 4 << 20, [(512 << 10, 700_000)])
    secret = tmp_path / "pw"
    secret.write_text("correct horse")  # no newline: qemu takes the file's bytes as they are
    luks = tmp_path / "g.luks"
    qemu_create(luks, secret, 4 << 20)  # retries qemu's flaky PBKDF2 benchmark on a loaded machine
    qemu_write(luks, secret, raw)
    xz = tmp_path / "g.raw.xz"
    xz.write_bytes(run("xz", "-T2", "--block-size=1MiB", "-c", raw).stdout)
    with serve_cli(luks, xz, "--socket", tmp_path / "s", "--passphrase-file", secret) as (_, uri):
        base = uri.split("?")[0].rsplit("/", 1)[0]
        query = "?" + uri.split("?")[1]
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, f"{base}/g.luks{query}")
        out = tmp_path / "x.raw"
        run("nbdcopy", f"{base}/g.raw.xz{query}", out)
        assert out.read_bytes() == raw.read_bytes()
    # and through the nbdkit plugin, the passphrase again from a file
    plugin = subprocess.run([*IMAGEFORMATS, "nbdkit-plugin"], capture_output=True, text=True, check=True).stdout.strip()
    out2 = tmp_path / "l.raw"
    run("nbdkit", "-U", tmp_path / "k", "python", plugin, f"file={luks}", f"passphrase-file={secret}",
        "--run", f'nbdcopy "$uri" {out2}')
    assert out2.read_bytes() == raw.read_bytes()


def test_xz_cache_views_sent_while_blocks_are_evicted(tmp_path):
    """Aligned reads of a cached xz Block go out as views of the cache (no copy) while other
    requests evict Blocks and decode new ones into recycled buffers: nbdcopy (4 connections,
    many requests in flight) must still get exactly xz's own output."""
    raw = tmp_path / "r.raw"
    # text: no zero or stored pieces, so each Block is cached whole, as one buffer
    raw.write_bytes(b"".join(b"line %d of %d\n" % (i, i * 7919 % 100003) for i in range(600_000))[:6 << 20])
    xz = tmp_path / "r.raw.xz"
    xz.write_bytes(run("xz", "-0", "-T2", "--block-size=256KiB", "-c", raw).stdout)
    oracle = run("xz", "-dc", xz).stdout
    dev = XzDevice(FileDevice(xz), cache_size=1 << 20)  # 4 Blocks of 24: constant eviction
    with ServerThread([Export("x", dev)], str(tmp_path / "s")) as srv:
        out = tmp_path / "out.raw"
        for _ in range(3):
            run("nbdcopy", "--request-size=65536", f"nbd+unix:///x?socket={srv.sock_path}", out)
            assert out.read_bytes() == oracle
        assert dev.cache_info()["reused-buffers"] > 0, "the test did not exercise buffer reuse"
    dev.close()
