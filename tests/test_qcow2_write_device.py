"""Writable Qcow2Device: random writes/zeroes/discards against a whole-buffer model; the result is
read back by qemu-img convert and must pass qemu-img check; simulated crashes at every write
leave images qemu-img check finds free of corruption (leaks allowed)."""

from __future__ import annotations

import json
import os
import random
import threading

import pytest
from peers import run_qemu_luks, stop_process
from qcow2_oracle import qemu_raw, sh

import imageformats
from imageformats.block import FileDevice, copy
from imageformats.errors import DeviceIOError, NotFastError, ReadOnlyError, UnsupportedFeatureError
from imageformats.qcow2 import Qcow2Device

MiB = 1 << 20


def qemu_check(path, *extra, cwd=None) -> dict:
    proc = sh("qemu-img", "check", "--output=json", *extra, path, check=False, cwd=cwd)
    doc = json.loads(proc.stdout or b"{}")
    assert proc.returncode in (0, 3), proc.stderr  # 3 = leaked clusters only
    assert doc.get("corruptions", 0) == 0 and doc.get("check-errors", 0) == 0, doc
    return doc


def workload(dev, model: bytearray, seed: int, ops: int, max_len: int = 200_000):
    rnd = random.Random(seed)
    size = len(model)
    for _ in range(ops):
        r = rnd.random()
        off = rnd.randrange(size)
        if rnd.random() < 0.3:
            off &= ~0xFFFF
        n = rnd.randrange(1, min(max_len, size - off) + 1)
        if r < 0.6:
            data = rnd.randbytes(n)
            dev.pwrite(data, off)
            model[off : off + n] = data
        elif r < 0.85:
            dev.zero(n, off)
            model[off : off + n] = bytes(n)
        else:
            dev.trim(n, off)  # content afterwards is unspecified: take what the device says
            model[off : off + n] = dev.pread(n, off)


@pytest.mark.parametrize("opts", [
    "cluster_size=65536",
    "cluster_size=512",
    "compat=0.10",
    "extended_l2=on",
    "cluster_size=2M",
    "cluster_size=4096,refcount_bits=1",
    "cluster_size=16384,refcount_bits=64,lazy_refcounts=on",
])
def test_random_ops_match_model(tmp_path, opts):
    img = tmp_path / "w.qcow2"
    size = 4 * MiB
    sh("qemu-img", "create", "-f", "qcow2", "-o", opts, img, size)
    model = bytearray(size)
    with imageformats.open(str(img), writable=True) as dev:
        assert not dev.readonly
        workload(dev, model, seed=len(opts), ops=50)
        assert dev.pread(size, 0) == model
    assert qemu_raw(img, tmp_path) == model
    qemu_check(img)
    assert qemu_check(img).get("leaks", 0) == 0


def test_cow_from_backing_chain(tmp_path):
    """Partial writes over a compressed qcow2 base and a raw base: the rest comes from the backing."""
    raw = tmp_path / "b.raw"
    raw.write_bytes(os.urandom(MiB) + b"pattern!" * (MiB // 8) + bytes(2 * MiB))
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "convert", "-c", "-O", "qcow2", raw, base)
    for backing, fmt in ((base.name, "qcow2"), (raw.name, "raw")):
        for opts in ("cluster_size=65536", "extended_l2=on", "compat=0.10,cluster_size=4096"):
            top = tmp_path / "top.qcow2"
            sh("qemu-img", "create", "-f", "qcow2", "-o", opts, "-b", backing, "-F", fmt, top.name, 5 * MiB,
               cwd=tmp_path)
            model = bytearray(qemu_raw(top, tmp_path))
            with imageformats.open(str(top), writable=True) as dev:
                workload(dev, model, seed=7, ops=30, max_len=100_000)
            assert qemu_raw(top, tmp_path) == model, (backing, opts)
            qemu_check(top)
            top.unlink()


def test_overwrite_compressed_clusters(tmp_path):
    raw = tmp_path / "s.raw"
    raw.write_bytes((b"compress me " * 400_000)[: 4 * MiB])
    img = tmp_path / "c.qcow2"
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, img)
    model = bytearray(raw.read_bytes())
    with imageformats.open(str(img), writable=True) as dev:
        workload(dev, model, seed=3, ops=40)
    assert qemu_raw(img, tmp_path) == model
    assert qemu_check(img).get("leaks", 0) == 0


@pytest.mark.parametrize("raw_flag", [False, True])
def test_external_data_file(tmp_path, raw_flag):
    img = tmp_path / "d.qcow2"
    o = "data_file=d.data" + (",data_file_raw=on" if raw_flag else "")
    sh("qemu-img", "create", "-f", "qcow2", "-o", o, img.name, 3 * MiB, cwd=tmp_path)
    model = bytearray(3 * MiB)
    with imageformats.open(str(img), writable=True) as dev:
        workload(dev, model, seed=11, ops=30)
    assert qemu_raw(img, tmp_path, cwd=tmp_path) == model
    qemu_check(img.name, cwd=tmp_path)
    if raw_flag:  # "the external data file can be read as a consistent standalone raw image"
        data = (tmp_path / "d.data").read_bytes()
        assert data[: len(model)].ljust(len(model), b"\0") == model


def test_luks_encrypted_write(tmp_path):
    pw = tmp_path / "pw"
    pw.write_bytes(b"qcow2-luks-pass")
    obj = ["--object", f"secret,id=s0,file={pw}"]
    img = tmp_path / "l.qcow2"
    run_qemu_luks("qemu-img", "create", "-f", "qcow2", *obj, "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=200",
                  img, 2 * MiB)
    opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=s0"
    sh("qemu-io", *obj, "--image-opts", "-c", "write -P 0x21 10000 300000", opts)
    model = bytearray(qemu_raw(opts, tmp_path, *obj, "--image-opts"))
    with imageformats.open(str(img), writable=True, passphrase=b"qcow2-luks-pass") as dev:
        assert dev.pread(len(model), 0) == model
        workload(dev, model, seed=5, ops=20)
    assert qemu_raw(opts, tmp_path, *obj, "--image-opts") == model
    qemu_check(opts, *obj, "--image-opts")


def test_zero_fast_and_metadata_only(tmp_path):
    img = tmp_path / "z.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", img, 2 * MiB)
    sh("qemu-io", "-c", "write -P 1 0 2M", img)
    with imageformats.open(str(img), writable=True) as dev:
        with pytest.raises(NotFastError):
            dev.zero(1000, 5, fast=True)
        dev.zero(MiB, 0, fast=True)  # whole clusters: zero flags
        assert dev.pread(MiB + 1, 0) == bytes(MiB) + b"\1"
    qmap = json.loads(sh("qemu-img", "map", "--output=json", img).stdout)
    assert qmap[0]["start"] == 0 and qmap[0]["length"] == MiB and qmap[0]["zero"] and not qmap[0]["data"]
    assert qemu_check(img).get("leaks", 0) == 0
    # the freed clusters were released (refcount 0): qemu reports them neither leaked nor allocated
    assert json.loads(sh("qemu-img", "check", "--output=json", img).stdout)["allocated-clusters"] < 32


def test_refusals(tmp_path):
    img = tmp_path / "r.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", img, MiB)
    with imageformats.open(str(img)) as dev:
        with pytest.raises(ReadOnlyError):
            dev.pwrite(b"x", 0)
    sh("qemu-img", "snapshot", "-c", "s", img)
    with pytest.raises(UnsupportedFeatureError, match="snapshots"):
        imageformats.open(str(img), writable=True)


def test_clones_write_concurrently(tmp_path):
    img = tmp_path / "t.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", img, 8 * MiB)
    chunks = {i: os.urandom(256 * 1024) for i in range(32)}
    with imageformats.open(str(img), writable=True) as dev:
        clones = [dev.clone() for _ in range(2)]

        def work(d, keys):
            for k in keys:
                d.pwrite(chunks[k], k * 256 * 1024)

        threads = [threading.Thread(target=work, args=(clones[t], range(t, 32, 2))) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in clones:
            c.close()
    expect = b"".join(chunks[i] for i in range(32))
    assert qemu_raw(img, tmp_path) == expect
    assert qemu_check(img).get("leaks", 0) == 0


def test_copy_into_qcow2(tmp_path, sparse_raw):
    img = tmp_path / "dst.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", img, 16 * MiB)
    with imageformats.open(str(sparse_raw)) as src, imageformats.open(str(img), writable=True) as dst:
        copy(src, dst)
    sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", sparse_raw, img)
    qemu_check(img)


class CrashFile(FileDevice):
    """A file whose writes stop at the N-th one (the power goes out); writes since the last
    flush may be lost in any combination, as a disk cache may lose them."""

    def __init__(self, path, limit: int, seed: int):
        super().__init__(path, writable=True)
        self.limit = limit
        self.count = 0
        self.pending: list[tuple[int, bytes]] = []  # (offset, old bytes) since the last flush
        self.rnd = random.Random(seed)

    def _pwrite(self, buf, offset):
        self.count += 1
        if self.count >= self.limit:
            raise DeviceIOError("power failure")
        old = bytearray(len(buf))
        avail = max(0, min(len(buf), os.fstat(self.fd).st_size - offset))
        if avail:
            os.preadv(self.fd, [memoryview(old)[:avail]], offset)
        self.pending.append((offset, bytes(old)))
        super()._pwrite(buf, offset)

    def flush(self):
        self._check_open()
        if self.count < self.limit:
            self.pending.clear()
        super().flush()

    def crash(self):
        """Lose a random subset of the unflushed writes (newest first)."""
        for offset, old in reversed(self.pending):
            if self.rnd.random() < 0.5:
                os.pwrite(self.fd, old, offset)
        self.pending.clear()


@pytest.mark.parametrize("opts", ["cluster_size=512", "extended_l2=on", "compat=0.10,cluster_size=4096"])
def test_crash_at_any_write_leaves_no_corruption(tmp_path, opts):
    src = tmp_path / "src.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", opts, src, 12 * MiB)
    sh("qemu-io", "-c", "write -P 5 0 1M", "-c", "write -z 2M 1M", src)
    pristine = src.read_bytes()

    def run(limit):
        img = tmp_path / f"c{limit}.qcow2"
        img.write_bytes(pristine)
        f = CrashFile(str(img), limit, seed=limit)
        dev = Qcow2Device(f, writable=True)
        crashed = False
        try:
            rnd = random.Random(1)
            for i in range(12):
                off = rnd.randrange(12 * MiB - 1_100_000)
                if i % 4 == 3:
                    dev.zero(rnd.randrange(1, 300_000), off)
                elif i % 4 == 2:
                    dev.trim(rnd.randrange(1, 300_000), off)
                else:
                    dev.pwrite(rnd.randbytes(rnd.randrange(1, 1_100_000)), off)
        except DeviceIOError:
            crashed = True
            f.crash()
        writes = f.count
        dev._closed = True  # the process died: nothing more is written
        f.close()
        if dev.backing_image is not None:
            dev.backing_image.close()
        qemu_check(img)
        img.unlink()
        return crashed, writes

    crashed, total = run(10**9)
    assert not crashed
    limits = sorted(set(list(range(1, min(total, 40))) + list(range(40, total, max(1, total // 25)))))
    for limit in limits:
        assert run(limit)[0]


def test_refcount_nonsense_is_corrupt(tmp_path):
    """A refcount table entry pointing outside the file or unaligned: CorruptImageError on the
    write that needs it, and nothing written to the image before that."""
    import struct

    from imageformats.errors import CorruptImageError

    for value, match in (((1 << 45), "outside"), (0x10200, "unaligned")):
        img = tmp_path / "rc.qcow2"
        sh("qemu-img", "create", "-f", "qcow2", img, 4 * MiB)
        with open(img, "r+b") as f:
            f.seek(48)
            rt = struct.unpack(">Q", f.read(8))[0]
            f.seek(rt)
            f.write(struct.pack(">Q", value))
        before = img.read_bytes()
        with pytest.raises(CorruptImageError, match=match):
            with imageformats.open(str(img), writable=True) as dev:
                dev.pwrite(b"x" * 70000, 0)
        assert img.read_bytes()[:65536] == before[:65536]
        img.unlink()


def test_contract_writable(tmp_path):
    from contract import check_device, check_writable

    img = tmp_path / "w.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", img, 3 * MiB)
    sh("qemu-io", "-c", "write -P 9 0 1M", img)
    dev = imageformats.open(str(img), writable=True)
    check_writable(dev)
    dev.close()
    qemu_check(img)
    check_device(imageformats.open(str(img)), expected=qemu_raw(img, tmp_path))


def test_served_writable_over_nbd(tmp_path):
    """qemu-io writes through our NBD server into a writable Qcow2Device; qemu reads the result."""
    import subprocess
    import sys
    import time

    img = tmp_path / "srv.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", img, 8 * MiB)
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "imageformats", "serve", "--writable", str(img),
                             "--socket", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        uri = f"nbd+unix:///srv.qcow2?socket={sock}"
        sh("qemu-io", "-f", "raw", "-c", "write -P 7 1000 100k", "-c", "write -z 1M 1M", "-c", "discard 4M 64k",
           "-c", "write -P 8 5M 3", uri)
        model = bytearray(8 * MiB)
        model[1000 : 1000 + 102400] = b"\7" * 102400
        model[5 * MiB : 5 * MiB + 3] = b"\10\10\10"
        got = sh("nbdcopy", uri, "-", timeout=60).stdout
        # discard leaves unspecified content; here the range was never written, so it reads as zeroes
        assert got == model
    finally:
        stop_process(proc)
    assert qemu_raw(img, tmp_path) == model
    assert qemu_check(img).get("leaks", 0) == 0
