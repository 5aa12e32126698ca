"""Hypothesis fuzzing of every parser (qcow2, LUKS1, gzip, xz, zstd) from a seed corpus made by the
real tools (qemu-img/qemu-io, cryptsetup, gzip, pigz, partial-deflate, xz, zstd, pyzstd).

Each example mutates one seed image (bit flips, byte writes, header/table/footer fields set to boundary
values like 0, 2^31, 2^63-1, truncation, splices, zeroed runs) and checks the property in
fuzz_harness.exercise: only ImageFormatError subclasses escape, bounded time, bounded allocation,
no read outside the backing device.  The long run is scripts/fuzz-long.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

import fuzz_harness as H

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
SEEDS = ["tiny.qcow2", "tiny-compressed.qcow2", "ext.qcow2", "disk.raw.xz", "disk-1block.raw.xz",
         "disk.raw.gz", "pigz.gz", "partial-deflate.gz", "disk.raw.zst", "pyzstd-seekable.zst", "luks1.img",
         "luks.qcow2"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return {s.name: s for s in H.build_corpus(tmp_path_factory.mktemp("fuzz-corpus"))}


def test_corpus_opens_and_reads_right(corpus):
    """The unmutated seeds open and read the content the real tools put there (so a fuzz run starts valid)."""
    from imageformats import detect

    raw = H.disk_raw()
    for name in ("disk.raw.xz", "disk-1block.raw.xz", "disk.raw.gz", "pigz.gz", "partial-deflate.gz",
                 "disk.raw.zst", "pyzstd-seekable.zst"):
        s = corpus[name]
        with detect.open(H.RecordingDevice(s.data), format=s.fmt) as dev:
            assert dev.pread(dev.size, 0) == raw, name
    for name in corpus:
        assert H.exercise(corpus[name], corpus[name].data) == "ok", name


@pytest.mark.parametrize("name", SEEDS)
def test_fuzz(corpus, name):
    seed = corpus[name]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(muts=H.mutation_strategy())
    def run(muts):
        H.exercise(seed, bytes(H.apply(seed.data, seed, muts)))

    run()


def test_regression_qcow2_backing_name_with_nul(corpus):
    """Found by the fuzzer: a backing file name holding a NUL byte escaped as ValueError from os.path."""
    import struct

    from imageformats.errors import CorruptImageError

    data = bytearray(corpus["tiny.qcow2"].data)
    name = b"base\0.qcow2"
    struct.pack_into(">QI", data, 8, 4096 - 64, len(name))  # backing_file_offset, backing_file_size
    data[4096 - 64:4096 - 64 + len(name)] = name
    from imageformats import detect

    with pytest.raises(CorruptImageError, match="NUL"):
        detect.open(H.RecordingDevice(bytes(data)), format="qcow2")


def test_luks_iteration_cap_is_a_corrupt_image_error(corpus):
    """Found by the fuzzer: a hostile PBKDF2 count makes unlocking take minutes; above the cap
    (keyslots.MAX_ITERATIONS) it is refused quickly with CorruptImageError."""
    import struct
    import time

    from imageformats import detect
    from imageformats.errors import CorruptImageError
    from imageformats.luks1 import keyslots

    seed = corpus["luks1.img"]
    data = bytearray(seed.data)
    struct.pack_into(">I", data, 208 + 4, 0xFFFFFFFF)  # key slot 0 iterations
    t = time.monotonic()
    with pytest.raises(CorruptImageError, match="iteration"):
        detect.open(H.RecordingDevice(bytes(data)), format="luks", passphrase=H.PASSPHRASE)
    assert time.monotonic() - t < 5
    assert keyslots.MAX_ITERATIONS <= 100_000_000
