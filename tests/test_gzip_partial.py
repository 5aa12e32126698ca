"""partial-deflate and gzip-patch against the real gzip, zcat, pigz and xz."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imageformats.block import FileDevice
from imageformats.errors import InvalidArgumentError, ReadOnlyError
from imageformats.gzip_partial import header as H
from imageformats.gzip_partial.layout import encode_map, map_payload_size, walk
from imageformats.gzip_partial.patch import journal_path, list_ranges, patch_file
from imageformats.gzip_partial.writer import boundaries_to_stored, write_gzip
from imageformats.gzip_partial.xz_stored import write_xz
from peers import run

_libz = ctypes.CDLL(ctypes.util.find_library("z"))
_libz.crc32_combine64.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64]
_libz.crc32_combine64.restype = ctypes.c_ulong


def sample(size: int, seed: int = 0) -> bytes:
    """Disk-like bytes: text-ish runs, random runs and zero runs."""
    rnd = random.Random(seed)
    out = bytearray()
    words = [b"kernel", b"initrd", b"grub", b"menuentry", b"linux", b"/boot", b"\n", b" ", b"0123"]
    while len(out) < size:
        kind = rnd.random()
        n = rnd.randrange(1, 20000)
        if kind < 0.4:
            out += b"".join(rnd.choice(words) for _ in range(n // 5 + 1))[:n]
        elif kind < 0.7:
            out += rnd.randbytes(n)
        else:
            out += bytes(n)
    return bytes(out[:size])


def zcat(path) -> bytes:
    return run("gzip", "-dc", path).stdout


def make(tmp_path, data: bytes, stored, name="out.gz", **kw):
    src = tmp_path / "in.img"
    src.write_bytes(data)
    out = tmp_path / name
    with FileDevice(str(src)) as dev:
        write_gzip(dev, str(out), stored, **kw)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 300_000), st.lists(st.floats(0, 1), max_size=6), st.integers(0, 2**32), st.data())
def test_boundaries_round_trip_and_patch(tmp_path_factory, size, fracs, seed, data):
    tmp = tmp_path_factory.mktemp("pd")
    payload = sample(size, seed)
    bounds = sorted(int(f * size) for f in fracs)  # duplicates = empty ranges; 1.0 = at EOF
    stored = boundaries_to_stored(bounds, size)
    out = make(tmp, payload, stored, level=data.draw(st.sampled_from([1, 6, 9])))
    run("gzip", "-t", out)
    assert zcat(out) == payload
    expect = [(s, e) for s, e in stored if e > s]
    merged = []
    for s, e in expect:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    source, usize, ranges = list_ranges(str(out))
    assert (source, usize, ranges) == ("map", size, merged)
    if merged:
        s, e = data.draw(st.sampled_from(merged))
        a = data.draw(st.integers(s, e))
        b = data.draw(st.integers(a, e))
        new = os.urandom(b - a)
        patch_file(str(out), [(a, new)])
        model = payload[:a] + new + payload[b:]
        run("gzip", "-t", out)
        assert zcat(out) == model
        assert run("pigz", "-dc", out).stdout == model


def test_empty_input(tmp_path):
    out = make(tmp_path, b"", [])
    run("gzip", "-t", out)
    assert zcat(out) == b""
    assert list_ranges(str(out))[1:] == (0, [])


def test_cli_seed_form_pigz_and_zcat(tmp_path):
    data = sample(3 << 20, 7)
    (tmp_path / "img").write_bytes(data)
    out = tmp_path / "img.gz"
    r = subprocess.run(["partial-deflate", tmp_path / "img", out, "0", "1M", str(len(data) - 4096)],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert run("zcat", out).stdout == data
    assert run("pigz", "-dc", out).stdout == data
    listed = subprocess.run(["gzip-patch", "--list", out], capture_output=True, text=True, check=True).stdout
    assert listed.split("\n")[:2] == ["0 1048576 1048576", f"{len(data) - 4096} {len(data)} 4096"]
    # The other option forms give the same kind of file.
    out2 = tmp_path / "img2.gz"
    subprocess.run(["partial-deflate", "-l", "1", "--threads", "1", "--stored", "0:1M", "--stored", "2M:2M+1",
                    tmp_path / "img", out2], capture_output=True)
    r = subprocess.run(["partial-deflate", "-l", "1", "--threads", "1", "--stored", "0:1M", "--stored",
                        "2097152:2101248", tmp_path / "img", out2], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert zcat(out2) == data
    assert list_ranges(str(out2))[2] == [(0, 1 << 20), (2097152, 2101248)]


@pytest.mark.parametrize("bounds", [["2M", "1M"], ["0", str(10 << 20)], ["-5"]])
def test_cli_validation_writes_nothing(tmp_path, bounds):
    (tmp_path / "img").write_bytes(sample(3 << 20, 1))
    out = tmp_path / "x.gz"
    r = subprocess.run(["partial-deflate", tmp_path / "img", out, *bounds], capture_output=True, text=True)
    assert r.returncode != 0
    assert "error" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["img"]


def test_patch_outside_stored_is_refused_and_file_untouched(tmp_path):
    data = sample(1 << 20, 3)
    out = make(tmp_path, data, [(100_000, 300_000)])
    before = out.read_bytes()
    with pytest.raises(ReadOnlyError, match=r"\[100000, 300000\)"):
        patch_file(str(out), [(299_990, b"x" * 20)])
    r = subprocess.run(["gzip-patch", out, "5"], input="abc", capture_output=True, text=True)
    assert r.returncode == ReadOnlyError.exit_code and "[100000, 300000)" in r.stderr
    assert out.read_bytes() == before
    assert not os.path.exists(journal_path(str(out)))


def test_cli_patch_from_stdin_and_file(tmp_path):
    data = sample(1 << 20, 4)
    out = make(tmp_path, data, [(0, 500_000)])
    subprocess.run(["gzip-patch", out, "1000"], input=b"hello", check=True)
    (tmp_path / "p").write_bytes(b"world" * 1000)
    subprocess.run(["gzip-patch", out, "200000", tmp_path / "p"], check=True)
    run("gzip", "-t", out)
    model = bytearray(data)
    model[1000:1005] = b"hello"
    model[200000:205000] = b"world" * 1000
    assert zcat(out) == bytes(model)


def test_patch_reads_only_patch_and_trailer(tmp_path, monkeypatch):
    """The patch touches O(patch) bytes: count what FileDevice reads."""
    data = sample(4 << 20, 5)
    out = make(tmp_path, data, [(0, 1 << 20), (3 << 20, 4 << 20)])
    reads = []
    orig = FileDevice._readinto

    def counting(self, buf, offset):
        reads.append(len(buf))
        return orig(self, buf, offset)

    monkeypatch.setattr(FileDevice, "_readinto", counting)
    patch_file(str(out), [(3_500_000, b"z" * 4096)])
    monkeypatch.undo()
    # header + map, trailer, block headers, old bytes, and <= 32 KiB of deflate input after the run
    assert sum(reads) < 4096 + 64 * 1024, reads
    model = data[:3_500_000] + b"z" * 4096 + data[3_504_096:]
    assert zcat(out) == model


def test_walk_of_foreign_gzip_and_back_references(tmp_path):
    """Stored blocks in a gzip we did not write; the 32 KiB that later data copies from stay read-only."""
    rnd = random.Random(9)
    block = rnd.randbytes(100_000)
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    raw = co.compress(block) + co.flush(zlib.Z_SYNC_FLUSH)
    raw += co.compress(block[-20_000:] * 3) + co.flush()
    path = tmp_path / "foreign.gz"
    path.write_bytes(raw)
    data = block + block[-20_000:] * 3
    assert zcat(path) == data
    with FileDevice(str(path)) as dev:
        lay = walk(dev)
        ranges = lay.editable_ranges()
    assert ranges and ranges[0][0] == 0
    end = ranges[0][1]
    assert end <= 100_000 - 32768  # the repeat copies from the tail of the stored data
    with pytest.raises(ReadOnlyError):
        patch_file(str(path), [(99_000, b"q")])
    patch_file(str(path), [(10, b"Q" * 100)])
    run("gzip", "-t", path)
    assert zcat(path) == data[:10] + b"Q" * 100 + data[110:]


def test_multi_member_patch(tmp_path):
    a, b = os.urandom(200_000), os.urandom(150_000)
    path = tmp_path / "m.gz"
    path.write_bytes(run("gzip", "-1", "-c", input=a).stdout + run("pigz", "-1", "-c", input=b).stdout)
    _, size, ranges = list_ranges(str(path))
    assert size == 350_000
    inside = [r for r in ranges if r[0] <= 250_000 < r[1]]
    assert inside, ranges
    patch_file(str(path), [(250_000, b"M" * 10)])
    run("gzip", "-t", path)
    assert zcat(path) == a + b[:50_000] + b"M" * 10 + b[50_010:]


def _zeros_member_crc(nbytes: int) -> int:
    """CRC-32 of nbytes zeroes by zlib alone (crc32 of 1 MiB, then libz's crc32_combine64 doubling)."""
    unit = 1 << 20
    assert nbytes % unit == 0
    c_unit = zlib.crc32(bytes(unit))
    total, have, have_len = 0, c_unit, unit
    n = nbytes // unit
    first = True
    while n:
        if n & 1:
            total = have if first else _libz.crc32_combine64(total, have, have_len)
            first = False
        have = _libz.crc32_combine64(have, have, have_len)
        have_len *= 2
        n >>= 1
    return total


def test_isize_wraps_mod_2_32(tmp_path):
    """A > 4 GiB member (built from repeated self-contained deflate pieces; 4 MB on disk)."""
    stored = os.urandom(70_000)
    zeros_len = (1 << 32) + (1 << 20)
    usize = len(stored) + zeros_len
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    piece = co.compress(bytes(1 << 20)) + co.flush(zlib.Z_SYNC_FLUSH)
    head = H.build_header(bytes(map_payload_size(1)))
    body = bytearray()
    fstart = len(head)
    for off in range(0, len(stored), H.STORED_MAX):
        chunk = stored[off:off + H.STORED_MAX]
        body += H.stored_block_header(len(chunk)) + chunk
    body += piece * (zeros_len >> 20) + H.FINAL_EMPTY_BLOCK
    trailer_offset = len(head) + len(body)
    crc = _libz.crc32_combine64(zlib.crc32(stored), _zeros_member_crc(zeros_len), zeros_len)
    payload = encode_map(usize, trailer_offset, [(0, len(stored), fstart, H.STORED_MAX)])
    head = head[: len(head) - len(payload)] + payload
    path = tmp_path / "big.gz"
    path.write_bytes(head + body + struct.pack("<II", crc, usize & 0xFFFFFFFF))
    assert usize & 0xFFFFFFFF == len(stored) + (1 << 20)  # ISIZE wrapped
    assert list_ranges(str(path))[1:] == (usize, [(0, len(stored))])
    new = b"N" * 5000
    patch_file(str(path), [(60_000, new)])
    patched = stored[:60_000] + new + stored[65_000:]
    want = _libz.crc32_combine64(zlib.crc32(patched), _zeros_member_crc(zeros_len), zeros_len)
    got_crc, got_isize = struct.unpack("<II", path.read_bytes()[-8:])
    assert (got_crc, got_isize) == (want, usize & 0xFFFFFFFF)
    from imageformats.gzip_partial.device import GzipDevice
    with GzipDevice(FileDevice(str(path))) as dev:
        assert dev.size == usize
        assert dev.pread(70_000 + 4096, 0) == patched + bytes(4096)


# -- crash safety ----------------------------------------------------------------------

CRASHER = r"""
import os, sys
import imageformats.gzip_partial.patch as P
k, torn = int(sys.argv[3]), sys.argv[4] == "torn"
calls = [0]
orig = P._pwrite
def crashing(fd, data, off):
    calls[0] += 1
    if calls[0] == k:
        if torn:
            os.pwrite(fd, bytes(data)[: len(data) // 2], off)
        os._exit(9)
    orig(fd, data, off)
P._pwrite = crashing
P.patch_file(sys.argv[1], [(int(sys.argv[2]), open(sys.argv[5], "rb").read())])
"""


@pytest.mark.parametrize("torn", ["clean", "torn"])
def test_killed_patch_is_never_silently_inconsistent(tmp_path, torn):
    data = sample(600_000, 11)
    out = make(tmp_path, data, [(0, 400_000)])
    original = out.read_bytes()
    new = os.urandom(70_000)  # spans two stored blocks: journal + 2 data pieces + trailer = 4 writes
    (tmp_path / "new").write_bytes(new)
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    model_new = data[:100_000] + new + data[170_000:]
    for k in range(1, 5):
        out.write_bytes(original)
        r = subprocess.run([sys.executable, script, out, "100000", str(k), torn, tmp_path / "new"],
                           capture_output=True)
        assert r.returncode == 9, r.stderr
        t = subprocess.run(["gzip", "-t", out], capture_output=True)
        content = subprocess.run(["gzip", "-dc", out], capture_output=True).stdout
        if t.returncode == 0:  # whatever gzip accepts is the old or the new content, never a mix
            assert content in (data, model_new)
        committed = os.path.exists(journal_path(str(out))) and k > 1
        result = subprocess.run(["gzip-patch", "--repair", out], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert not os.path.exists(journal_path(str(out)))
        run("gzip", "-t", out)
        assert zcat(out) == (model_new if committed else data), (k, torn)
    # A journal left behind is also completed automatically by the next patch.
    out.write_bytes(original)
    subprocess.run([sys.executable, script, out, "100000", "3", "clean", tmp_path / "new"], capture_output=True)
    patch_file(str(out), [(0, b"A")])
    assert zcat(out) == b"A" + model_new[1:]


def test_repair_refuses_a_file_changed_since(tmp_path):
    data = sample(300_000, 12)
    out = make(tmp_path, data, [(0, 200_000)])
    (tmp_path / "new").write_bytes(b"x" * 1000)
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    subprocess.run([sys.executable, script, out, "5000", "3", "clean", tmp_path / "new"], capture_output=True)
    assert os.path.exists(journal_path(str(out)))
    with open(out, "r+b") as f:  # someone else rewrote the bytes meanwhile
        f.seek(100)
        f.write(os.urandom(8000))
    r = subprocess.run(["gzip-patch", "--repair", out], capture_output=True, text=True)
    assert r.returncode != 0 and "journal kept" in r.stderr
    assert os.path.exists(journal_path(str(out)))


# -- xz ----------------------------------------------------------------------------------


@pytest.mark.parametrize("check", ["crc64", "crc32"])
def test_xz_round_trip_and_patch(tmp_path, check):
    data = sample(3 << 20, 21)
    (tmp_path / "img").write_bytes(data)
    out = tmp_path / "img.xz"
    r = subprocess.run(["partial-deflate", "--format", "xz", "--check", check, "-l", "1", tmp_path / "img", out,
                        "0", "1100000", "2M"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run("xz", "-t", out)
    assert run("xz", "-dc", out).stdout == data
    info = run("xz", "-lvv", out).stdout.decode()
    assert ("CRC64" if check == "crc64" else "CRC32") in info
    assert list_ranges(str(out))[2] == [(0, 1100000), (2 << 20, len(data))]
    new = os.urandom(200_000)
    patch_file(str(out), [(1_000_000, new[:100_000]), (2_500_000, new)])
    model = bytearray(data)
    model[1_000_000:1_100_000] = new[:100_000]
    model[2_500_000:2_700_000] = new
    run("xz", "-t", out)
    assert run("xz", "-dc", out).stdout == bytes(model)
    with pytest.raises(ReadOnlyError):
        patch_file(str(out), [(1_099_999, b"ab")])
    run("xz", "-t", out)


def test_xz_empty_and_all_stored(tmp_path):
    for data, bounds in ((b"", []), (sample(200_000, 2), [0])):
        src = tmp_path / "i"
        src.write_bytes(data)
        out = tmp_path / "o.xz"
        with FileDevice(str(src)) as dev:
            write_xz(dev, str(out), boundaries_to_stored(bounds, len(data)), preset=0)
        run("xz", "-t", out)
        assert run("xz", "-dc", out).stdout == data


def test_convert_output_gzip(tmp_path):
    data = sample(1 << 20, 31)
    (tmp_path / "img").write_bytes(data)
    out = tmp_path / "c.gz"
    r = subprocess.run([sys.executable, "-m", "imageformats", "convert", "-O", "gzip", "-o", "stored=0:64K,level=1",
                        tmp_path / "img", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert zcat(out) == data
    assert list_ranges(str(out))[2] == [(0, 65536)]


# -- hostile and odd inputs --------------------------------------------------------------


def test_forged_or_stale_map_is_not_trusted(tmp_path):
    data = sample(1 << 20, 70)
    out = make(tmp_path, data, [(0, 300_000)])
    raw = bytearray(out.read_bytes())
    # The map's first run: claim it is longer than it is.
    at = raw.index(H.MAP_SI) + 4 + H.MAP_HEADER_SIZE
    ustart, ulen, fstart, blocklen = H.MapRun.unpack_from(raw, at)
    H.MapRun.pack_into(raw, at, ustart, ulen + 100_000, fstart, blocklen)
    forged = tmp_path / "forged.gz"
    forged.write_bytes(bytes(raw))
    run("gzip", "-t", forged)  # still a valid gzip (FEXTRA is not covered by the CRC)
    source, size, ranges = list_ranges(str(forged))
    assert source == "walk" and size == len(data)
    assert ranges[0] == (0, 300_000)
    patch_file(str(forged), [(299_000, b"w" * 1000)])
    run("gzip", "-t", forged)
    with pytest.raises(ReadOnlyError):
        patch_file(str(forged), [(300_000, b"w")])


def test_truncated_and_garbage_files(tmp_path):
    from imageformats.errors import CorruptImageError
    from imageformats.gzip_partial.device import GzipDevice

    data = sample(600_000, 71)
    out = make(tmp_path, data, [(0, 300_000)])
    raw = out.read_bytes()
    cases = {
        "truncated": raw[: len(raw) - 50_000],
        "no-trailer": raw[:-8],
        "bad-name": b"\x1f\x8b\x08\x08" + bytes(6) + b"x" * 70_000,
        "garbage-after": raw + b"garbage",
        "reserved-flags": raw[:3] + bytes([raw[3] | 0x80]) + raw[4:],
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.gz"
        bad.write_bytes(blob)
        before = bad.read_bytes()
        with pytest.raises(CorruptImageError):
            GzipDevice(FileDevice(str(bad))).pread(1000, 310_000)
        with pytest.raises(CorruptImageError):
            patch_file(str(bad), [(10, b"x")])
        assert bad.read_bytes() == before, name
    # Trailing zero padding is accepted, like gzip does.
    padded = tmp_path / "padded.gz"
    padded.write_bytes(raw + bytes(1000))
    with GzipDevice(FileDevice(str(padded))) as dev:
        assert dev.pread(1000, 500_000) == data[500_000:501_000]


def test_one_patcher_at_a_time(tmp_path):
    from imageformats.gzip_partial.device import GzipDevice

    data = sample(400_000, 72)
    out = make(tmp_path, data, [(0, 300_000)])
    with GzipDevice(FileDevice(str(out), writable=True), writable=True) as dev:
        dev.pwrite(b"D" * 10, 0)
        r = subprocess.run(["gzip-patch", out, "100"], input="x", capture_output=True, text=True)
        assert r.returncode != 0 and "another process" in r.stderr
    assert zcat(out) == b"D" * 10 + data[10:]


def test_partition_option_mbr(tmp_path):
    disk = tmp_path / "mbr.img"
    disk.write_bytes(sample(4 << 20, 73))
    run("sfdisk", "-q", disk, input=b"label: dos\nstart=2048, size=2048\nstart=4096, size=2048\n")
    out = tmp_path / "mbr.gz"
    r = subprocess.run(["partial-deflate", "--partition", "2", disk, out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert list_ranges(str(out))[2] == [(4096 * 512, 6144 * 512)]
    assert zcat(out) == disk.read_bytes()
    r = subprocess.run(["partial-deflate", "--partition", "3", disk, tmp_path / "x.gz"], capture_output=True, text=True)
    assert r.returncode == InvalidArgumentError.exit_code and "partition 3" in r.stderr


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2_500_000), st.lists(st.floats(0, 1), max_size=4), st.data())
def test_xz_boundaries_property(tmp_path_factory, size, fracs, data):
    tmp = tmp_path_factory.mktemp("xz")
    payload = sample(size, size)
    stored = boundaries_to_stored(sorted(int(f * size) for f in fracs), size)
    src = tmp / "i"
    src.write_bytes(payload)
    out = tmp / "o.xz"
    with FileDevice(str(src)) as dev:
        write_xz(dev, str(out), stored, preset=0, check=data.draw(st.sampled_from(["crc32", "crc64"])))
    run("xz", "-t", out)
    assert run("xz", "-dc", out).stdout == payload
    ranges = list_ranges(str(out))[2]
    # every stored range is editable (a tiny incompressible compressed block may be too: LZMA2 stores it)
    for s, e in stored:
        assert s == e or any(a <= s and e <= b for a, b in ranges), (stored, ranges)
    if ranges:
        s, e = data.draw(st.sampled_from(ranges))
        a = data.draw(st.integers(s, e))
        b = data.draw(st.integers(a, e))
        new = os.urandom(b - a)
        patch_file(str(out), [(a, new)])
        run("xz", "-t", out)
        assert run("xz", "-dc", out).stdout == payload[:a] + new + payload[b:]


def test_reader_refuses_half_patched_file(tmp_path):
    from imageformats.errors import CorruptImageError
    from imageformats.gzip_partial.device import GzipDevice

    data = sample(300_000, 74)
    out = make(tmp_path, data, [(0, 200_000)])
    (tmp_path / "new").write_bytes(b"y" * 1000)
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    subprocess.run([sys.executable, script, out, "5000", "2", "torn", tmp_path / "new"], capture_output=True)
    with pytest.raises(CorruptImageError, match="--repair"):
        GzipDevice(FileDevice(str(out)))
    with GzipDevice(FileDevice(str(out), writable=True), writable=True) as dev:  # a writable open repairs
        assert dev.pread(1000, 5000) == b"y" * 1000
    run("gzip", "-t", out)
