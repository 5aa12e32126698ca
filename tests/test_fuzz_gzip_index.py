"""Fuzzing the gzip index import (`gzip_index=PATH`, GzipDevice.export_index/_import): the index of a
real `gzip -9` / `pigz` file is saved, then its JSON values are replaced (boundary numbers, negative
numbers, wrong types, wrong arity) or its bytes flipped/truncated, and the image opened with it.

Property: only ImageFormatError subclasses escape, bounded time and allocation, no read outside the
file (fuzz_harness), and a whole read is either the real content (`gzip -d`'s) or an error -- a damaged
index must not yield silently wrong data (the member CRC-32 is checked on a whole read).
"""

from __future__ import annotations

import json
import struct
import subprocess
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_harness as H
from imageformats import detect
from imageformats.errors import ImageFormatError
from imageformats.gzip_partial.device import INDEX_MAGIC

VALUES = st.one_of(st.sampled_from(H.BOUNDARY + [-1, -(1 << 63)]), st.integers(-10, 10),
                   st.sampled_from(["x", None, [], {}, 1.5, True]))


@pytest.fixture(scope="module")
def gz(tmp_path_factory):
    d = tmp_path_factory.mktemp("gzidx")
    raw = H.disk_raw()
    (d / "disk.raw").write_bytes(raw)
    out = {}
    for name, cmd in (("gzip", ["gzip", "-9", "-n", "-c"]), ("pigz", ["pigz", "-b", "128", "-c"])):
        data = subprocess.run(cmd + [str(d / "disk.raw")], capture_output=True, check=True).stdout
        idx = d / f"{name}.idx"
        with detect.open(H.RecordingDevice(data), format="gzip", gzip_span=65536) as dev:
            dev.export_index(str(idx))
        out[name] = (data, idx.read_bytes())
    return raw, out


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    yield path


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


@pytest.mark.parametrize("which", ["gzip", "pigz"])
def test_fuzz_gzip_index_import(gz, tmp_path, which):
    raw, files = gz
    data, index = files[which]
    (n,) = struct.unpack("<Q", index[8:16])
    meta0 = json.loads(index[16:16 + n])
    blob = index[16 + n:]
    leaves = [p for p in _leaves(meta0) if p and p[0] != "file_size"]

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(edits=st.lists(st.tuples(st.integers(0, len(leaves) - 1), VALUES), max_size=3),
           flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 7)), max_size=3),
           cut=st.one_of(st.none(), st.integers(0, 1 << 30)))
    def run(edits, flips, cut):
        meta = json.loads(json.dumps(meta0))
        for i, v in edits:
            try:
                _set(meta, leaves[i], v)
            except (TypeError, IndexError, KeyError):
                pass
        body = json.dumps(meta).encode()
        buf = bytearray(INDEX_MAGIC + struct.pack("<Q", len(body)) + body + blob)
        for pos, bit in flips:
            buf[pos % len(buf)] ^= 1 << bit
        if cut is not None:
            del buf[cut % len(buf):]
        path = tmp_path / "fuzz.idx"
        path.write_bytes(bytes(buf))
        backing = H.RecordingDevice(data)
        tracemalloc.start()
        try:
            with H.alarm(10):
                try:
                    with detect.open(backing, format="gzip", gzip_index=str(path)) as dev:
                        dev.pread(min(dev.size, 4096), dev.size // 2 if dev.size > 4096 else 0)
                        got = dev.pread(dev.size, 0)
                    assert got == raw, "a damaged index gave wrong data without an error"
                except ImageFormatError:
                    pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert not backing.log, f"read outside the file: {backing.log[:3]}"
        assert peak < H.MEMORY_CAP

    run()


def test_regression_index_length_field_is_checked_before_reading(gz, tmp_path):
    """A flipped bit in the metadata length (found by CI's random run: bit 4 of byte 11, +256 MiB)
    made the import read(n) allocate n bytes before finding the file far shorter."""
    raw, files = gz
    data, index = files["gzip"]
    bad = bytearray(index)
    bad[11] ^= 1 << 4
    path = tmp_path / "long.idx"
    path.write_bytes(bytes(bad))
    tracemalloc.start()
    try:
        with pytest.raises(ImageFormatError, match="runs past the end"):
            detect.open(H.RecordingDevice(data), format="gzip", gzip_index=str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_regression_index_with_a_string_offset(gz, tmp_path):
    """Found by this fuzzer: an access point whose offset was a string escaped as TypeError from bisect."""
    from imageformats.errors import CorruptImageError

    raw, files = gz
    data, index = files["pigz"]
    (n,) = struct.unpack("<Q", index[8:16])
    meta = json.loads(index[16:16 + n])
    meta["points"][-1][0] = "x"
    body = json.dumps(meta).encode()
    path = tmp_path / "bad.idx"
    path.write_bytes(INDEX_MAGIC + struct.pack("<Q", len(body)) + body + index[16 + n:])
    with pytest.raises(CorruptImageError, match="access point"):
        detect.open(H.RecordingDevice(data), format="gzip", gzip_index=str(path))
