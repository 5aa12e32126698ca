"""Shared fuzzing harness: a seed corpus made by the real tools, mutations, and the property.

Property checked for every mutated image (``exercise``):
  * opening it, reading a few ranges and listing extents either works or raises an
    ImageFormatError subclass -- nothing else escapes (no struct.error, IndexError, ...);
  * bounded time: a per-input alarm (ALARM_SECONDS) turns a hang into a failure;
  * bounded memory: tracemalloc's peak for the input stays under MEMORY_CAP;
  * no read outside the backing device: the backing records every request, and an
    out-of-range request is a failure (a parser must check a table offset against the
    file size before it reads, and say CorruptImageError).

Used by tests/test_fuzz_formats.py (CI-sized, hypothesis) and scripts/fuzz-long.py
(random mutations, many inputs, every distinct failure reported).
"""

from __future__ import annotations

import contextlib
import lzma
import os
import random
import signal
import subprocess
import traceback
import tracemalloc
from dataclasses import dataclass, field

from peers import run_qemu_luks
from pathlib import Path

from imageformats import detect
from imageformats.block import MemoryDevice
from imageformats.errors import ImageFormatError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
ALARM_SECONDS = float(os.environ.get("FUZZ_ALARM_SECONDS", "5"))
MEMORY_CAP = 192 << 20
PASSPHRASE = b"fuzz-passphrase"
FUZZ_MAX_ITERATIONS = 200_000

BOUNDARY = [0, 1, 2, 7, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
            0xFFFFFFFF, 1 << 32, (1 << 40) + 512, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


class FuzzFailure(AssertionError):
    pass


class RecordingDevice(MemoryDevice):
    """A read-only MemoryDevice that records every request that falls outside it (clones share the log)."""

    format_name = "fuzz-backing"

    def __init__(self, data, log=None):
        super().__init__(data if isinstance(data, bytearray) else bytearray(data), writable=False)
        self.log = log if log is not None else []

    def _note(self, length, offset):
        if offset < 0 or length < 0 or offset + length > self.size:
            self.log.append((offset, length))

    def readinto(self, buf, offset):
        self._note(len(memoryview(buf).cast("B")), offset)
        return super().readinto(buf, offset)

    def pread(self, length, offset):
        self._note(length, offset)
        return super().pread(length, offset)

    def extents(self, length, offset, *, req_one=False):
        self._note(length, offset)
        return super().extents(length, offset, req_one=req_one)

    def clone(self):
        self._check_open()
        return RecordingDevice(self._data, self.log)


@dataclass
class Seed:
    name: str
    fmt: str
    data: bytes
    options: dict = field(default_factory=dict)
    # (offset, width, byteorder) of fields worth overwriting with boundary values; negative = from the end
    fields: list = field(default_factory=list)


# -- corpus -------------------------------------------------------------------------------------

def _run(*args, **kw):
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def disk_raw() -> bytes:
    """The 1 MiB guest disk inside the compressed fixtures (see fixtures/make-fixtures.sh)."""
    return lzma.decompress((FIXTURES / "disk.raw.xz").read_bytes())


QCOW2_FIELDS = [(4, 4, "big"), (8, 8, "big"), (16, 4, "big"), (20, 4, "big"), (24, 8, "big"), (32, 4, "big"),
                (36, 4, "big"), (40, 8, "big"), (48, 8, "big"), (56, 4, "big"), (60, 4, "big"), (64, 8, "big"),
                (72, 8, "big"), (80, 8, "big"), (88, 8, "big"), (96, 4, "big"), (100, 4, "big"), (104, 1, "big"),
                (112, 4, "big"), (116, 4, "big")]
LUKS_FIELDS = [(6, 2, "big"), (104, 4, "big"), (108, 4, "big"), (168, 4, "big")] + [
    (208 + 48 * i + o, 4, "big") for i in range(2) for o in (0, 4, 40, 44)]
XZ_FIELDS = [(6, 2, "big"), (-12, 4, "little"), (-8, 4, "little"), (-4, 2, "little"), (12, 1, "big"),
             (13, 1, "big"), (14, 1, "big")]
ZSTD_FIELDS = [(-9, 4, "little"), (-5, 1, "big"), (-4, 4, "little"), (-17, 4, "little"), (-21, 4, "little"),
               (4, 1, "big"), (5, 1, "big")]
GZIP_FIELDS = [(3, 1, "big"), (10, 2, "little"), (12, 2, "little"), (14, 2, "little"), (16, 8, "little"),
               (24, 8, "little"), (-8, 4, "little"), (-4, 4, "little")]


def build_corpus(workdir: Path) -> list[Seed]:
    """Small real images made by the real tools (qemu-img/qemu-io, cryptsetup, xz, zstd, gzip, pigz, pyzstd)."""
    workdir.mkdir(parents=True, exist_ok=True)
    raw = disk_raw()
    rawp = workdir / "disk.raw"
    rawp.write_bytes(raw)
    seeds = []
    for name in ("tiny.qcow2", "tiny-compressed.qcow2"):
        seeds.append(Seed(name, "qcow2", (FIXTURES / name).read_bytes(), fields=QCOW2_FIELDS))
    # a v3 qcow2 with 64 KiB clusters, extended L2 entries and a 16-bit refcount order, by qemu-img
    q = workdir / "ext.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,extended_l2=on", q, "4M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 8k 12k", "-c", "write -z 1M 64k", q)
    seeds.append(Seed("ext.qcow2", "qcow2", q.read_bytes(), fields=QCOW2_FIELDS))
    # a LUKS-encrypted qcow2 (crypt_method 2) by qemu-img, with a short PBKDF2 time
    pf = workdir / "qpass"
    pf.write_bytes(PASSPHRASE)
    eq = workdir / "enc.qcow2"
    sec = f"secret,id=sec0,file={pf}"
    run_qemu_luks("qemu-img", "create", "-q", "-f", "qcow2", "--object", sec, "-o",
                  "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4096", eq, "1M")
    _run("qemu-io", "--object", sec, "--image-opts", "-c", "write -P 0x42 4k 8k",
         f"driver=qcow2,file.filename={eq},encrypt.key-secret=sec0")
    seeds.append(Seed("luks.qcow2", "qcow2", eq.read_bytes(), {"passphrase": PASSPHRASE}, fields=QCOW2_FIELDS))
    for name in ("disk.raw.xz", "disk-1block.raw.xz"):
        seeds.append(Seed(name, "xz", (FIXTURES / name).read_bytes(), fields=XZ_FIELDS))
    seeds.append(Seed("disk.raw.gz", "gzip", (FIXTURES / "disk.raw.gz").read_bytes(), fields=GZIP_FIELDS))
    p = workdir / "pigz.gz"
    with open(p, "wb") as f:
        subprocess.run(["pigz", "-c", "-b", "128", "-p", "2", str(rawp)], stdout=f, check=True)
    seeds.append(Seed("pigz.gz", "gzip", p.read_bytes(), fields=GZIP_FIELDS))
    pd = workdir / "partial.gz"
    _run("partial-deflate", "--stored", "64K:128K", "--stored", "512K:576K", "--threads", "1", rawp, pd)
    seeds.append(Seed("partial-deflate.gz", "gzip", pd.read_bytes(), fields=GZIP_FIELDS))
    seeds.append(Seed("disk.raw.zst", "zstd", (FIXTURES / "disk.raw.zst").read_bytes(), fields=ZSTD_FIELDS))
    import pyzstd

    zs = workdir / "seekable.zst"
    with pyzstd.SeekableZstdFile(str(zs), "w", max_frame_content_size=64 * 1024,
                                 level_or_option={pyzstd.CParameter.checksumFlag: 1}) as f:
        f.write(raw)
    seeds.append(Seed("pyzstd-seekable.zst", "zstd", zs.read_bytes(), fields=ZSTD_FIELDS))
    lk = workdir / "luks.img"
    kf = workdir / "pass"
    kf.write_bytes(PASSPHRASE)
    with open(lk, "wb") as f:
        f.truncate(3 << 20)
    _run("cryptsetup", "luksFormat", "--type", "luks1", "-q", "--pbkdf-force-iterations", "1000", "-c",
         "aes-xts-plain64", "-s", "256", "-h", "sha256", "--key-file", kf, lk)
    seeds.append(Seed("luks1.img", "luks", lk.read_bytes(), {"passphrase": PASSPHRASE}, fields=LUKS_FIELDS))
    return seeds


# -- mutations ----------------------------------------------------------------------------------
# A mutation is a tuple; apply() interprets it against the current buffer so it is always valid.

def apply(data: bytes, seed: Seed, muts) -> bytearray:
    buf = bytearray(data)
    for m in muts:
        n = len(buf)
        kind = m[0]
        if n == 0:
            break
        if kind == "flip":  # ("flip", where, bit) where: fraction-like int position key
            pos = _pos(n, m[1])
            buf[pos] ^= 1 << (m[2] & 7)
        elif kind == "byte":
            buf[_pos(n, m[1])] = m[2] & 0xFF
        elif kind == "field" and seed.fields:
            off, width, order = seed.fields[m[1] % len(seed.fields)]
            off = off if off >= 0 else n + off
            if 0 <= off and off + width <= n:
                v = BOUNDARY[m[2] % len(BOUNDARY)] if m[3] else m[2]
                if m[4]:  # small offsets from the boundary value too
                    v = v + (m[4] - 2)
                buf[off:off + width] = (v % (1 << (8 * width))).to_bytes(width, order)
        elif kind == "word":  # an aligned 4/8-byte word anywhere near the start, a boundary value
            width = 8 if m[3] else 4
            pos = (_pos(n, m[1]) // width) * width
            if pos + width <= n:
                buf[pos:pos + width] = (BOUNDARY[m[2] % len(BOUNDARY)] % (1 << (8 * width))).to_bytes(
                    width, "big" if m[4] else "little")
        elif kind == "truncate":
            buf = buf[:_pos(n, m[1])]
        elif kind == "splice":  # copy a run of the buffer elsewhere (tables pointing at tables)
            src, dst, ln = _pos(n, m[1]), _pos(n, m[2]), m[3] % 4096 + 1
            chunk = bytes(buf[src:src + ln])
            buf[dst:dst + len(chunk)] = chunk
            del buf[n:]
        elif kind == "zero":
            pos, ln = _pos(n, m[1]), m[2] % 65536 + 1
            buf[pos:pos + ln] = bytes(min(ln, n - pos))
        elif kind == "fixcrc" and seed.fmt == "xz":
            _xz_fix_crcs(buf)
    return buf


def _xz_fix_crcs(buf: bytearray) -> None:
    """Recompute the CRC32s of the xz stream header, first block header, index and footer (xz-file-format
    2.1.1.3, 2.1.2.2, 3.2.7, 4.4) so mutations of their fields reach the parser instead of the CRC check."""
    import zlib

    n = len(buf)
    if n < 24:
        return
    buf[8:12] = zlib.crc32(buf[6:8]).to_bytes(4, "little")
    hsize = (buf[12] + 1) * 4
    if buf[12] and 12 + hsize <= n:
        buf[12 + hsize - 4:12 + hsize] = zlib.crc32(buf[12:12 + hsize - 4]).to_bytes(4, "little")
    backward = (int.from_bytes(buf[n - 8:n - 4], "little") + 1) * 4
    start = n - 12 - backward
    if 12 <= start and backward >= 8:
        buf[n - 16:n - 12] = zlib.crc32(buf[start:n - 16]).to_bytes(4, "little")
    buf[n - 12:n - 8] = zlib.crc32(buf[n - 8:n - 2]).to_bytes(4, "little")


def _pos(n: int, key: int) -> int:
    """Positions are biased to where the metadata is: the first 4 KiB, the last 4 KiB, or anywhere."""
    where, k = key % 3, key // 3
    if where == 0:
        return k % min(n, 4096)
    if where == 1:
        return n - 1 - (k % min(n, 4096))
    return k % n


def random_mutations(rng: random.Random) -> list:
    muts = []
    for _ in range(rng.choice([1, 1, 1, 2, 3, 5, 8])):
        kind = rng.choice(["flip", "flip", "byte", "field", "field", "field", "word", "truncate", "splice", "zero"])
        if kind == "flip":
            muts.append(("flip", rng.getrandbits(40), rng.randrange(8)))
        elif kind == "byte":
            muts.append(("byte", rng.getrandbits(40), rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])))
        elif kind == "field":
            muts.append(("field", rng.randrange(64), rng.getrandbits(rng.choice([8, 16, 32, 64])),
                         rng.random() < 0.7, rng.randrange(5)))
        elif kind == "word":
            muts.append(("word", rng.getrandbits(40), rng.randrange(64), rng.random() < 0.5, rng.random() < 0.5))
        elif kind == "truncate":
            muts.append(("truncate", rng.getrandbits(40)))
        elif kind == "splice":
            muts.append(("splice", rng.getrandbits(40), rng.getrandbits(40), rng.getrandbits(16)))
        else:
            muts.append(("zero", rng.getrandbits(40), rng.getrandbits(16)))
    if rng.random() < 0.5:
        muts.append(("fixcrc",))
    return muts


def mutation_strategy():
    from hypothesis import strategies as st

    pos = st.integers(0, 1 << 40)
    one = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("field"), st.integers(0, 63), st.integers(0, (1 << 64) - 1), st.booleans(),
                  st.integers(0, 4)),
        st.tuples(st.just("word"), pos, st.integers(0, 63), st.booleans(), st.booleans()),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("splice"), pos, pos, st.integers(0, 65535)),
        st.tuples(st.just("zero"), pos, st.integers(0, 65535)),
        st.just(("fixcrc",)),
    )
    return st.lists(one, min_size=1, max_size=6)


# -- the property -------------------------------------------------------------------------------

class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    def handler(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _work(dev) -> None:
    size = dev.size
    if size <= 0:
        return
    for off, ln in ((0, 65536), (size // 2, 4096), (max(0, size - 5000), 5000), (size // 3, 1 << 20)):
        off = min(off, size)
        ln = min(ln, size - off)
        dev.pread(ln, off)
    n = 0
    for _ in dev.extents(min(size, 1 << 40), 0):
        n += 1
        if n >= 2000:
            break


def exercise(seed: Seed, data: bytes, *, memory: bool = True) -> str:
    """Open + read + extents on ``data``; return "ok" or the error class name; raise FuzzFailure on a violation."""
    backing = RecordingDevice(bytearray(data))
    outcome = "ok"
    # LUKS1 refuses PBKDF2 counts above keyslots.MAX_ITERATIONS (1e8); below it the cost is linear and
    # legitimate (cryptsetup accepts any count), so the fuzz lowers the cap to keep each input short.
    from imageformats.luks1 import keyslots

    saved_cap, keyslots.MAX_ITERATIONS = keyslots.MAX_ITERATIONS, FUZZ_MAX_ITERATIONS
    try:
        return _exercise(seed, data, backing, outcome, memory)
    finally:
        keyslots.MAX_ITERATIONS = saved_cap


def _exercise(seed, data, backing, outcome, memory):
    if memory:
        tracemalloc.start()
    try:
        with alarm(ALARM_SECONDS):
            try:
                dev = detect.open(backing, format=seed.fmt, **dict(seed.options))
                try:
                    _work(dev)
                finally:
                    dev.close()
            except ImageFormatError as e:
                outcome = type(e).__name__
                str(e)  # the message must be buildable
    except _Timeout:
        raise FuzzFailure(f"{seed.name}: no answer within {ALARM_SECONDS}s") from None
    except Exception as e:
        raise FuzzFailure(f"{seed.name}: {type(e).__name__} escaped: {e}\n{traceback.format_exc()}") from e
    finally:
        if memory:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    if backing.log:
        raise FuzzFailure(f"{seed.name}: read outside the {len(data)}-byte backing device: {backing.log[:3]} "
                          f"(outcome {outcome})")
    if memory and peak > MEMORY_CAP:
        raise FuzzFailure(f"{seed.name}: allocated {peak >> 20} MiB (cap {MEMORY_CAP >> 20} MiB)")
    return outcome
