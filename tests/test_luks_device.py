"""LuksDevice behaviour: clones under threads, flush/close/trim passthrough, read-only rules, no secrets shown."""

from __future__ import annotations

import json
import threading

import pytest

from imageformats import detect
from imageformats.block import BlockDevice, FileDevice, MemoryDevice
from imageformats.errors import OutOfRangeError, ReadOnlyError
from imageformats.luks1 import LuksDevice, luks_format, unlock
from luks_tools import PASSPHRASE, cs_format, qemu_read, random_bytes, secret_file
from peers import run

MiB = 1 << 20


class CountingDevice(MemoryDevice):
    def __init__(self, data):
        super().__init__(data)
        self.flushes = 0
        self.trims: list[tuple[int, int]] = []
        self.closed_count = 0
        self.can_trim = True

    def flush(self):
        self.flushes += 1

    def _trim(self, length, offset):
        self.trims.append((offset, length))

    def close(self):
        self.closed_count += 1
        super().close()


@pytest.fixture
def volume_bytes():
    mem = MemoryDevice(MiB + 256 * 1024)
    luks_format(mem, PASSPHRASE, iterations=1000, cipher="aes-cbc-essiv:sha256", key_bits=128)
    return bytes(mem.data)


def test_clones_in_threads_write_what_qemu_reads(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "t.luks"
    cs_format(img, pw, size=4 * MiB)
    model = bytearray(2 * MiB)
    dev = LuksDevice(FileDevice(img, writable=True), passphrase=PASSPHRASE, writable=True)
    dev.zero(dev.size, 0)
    errors = []

    def worker(i: int) -> None:
        try:
            with dev.clone() as c:
                for j in range(20):
                    off = (i * 20 + j) * 13_000 + i  # unaligned, non-overlapping between threads
                    data = random_bytes(9_000, i * 100 + j)
                    c.pwrite(data, off)
                    model[off : off + len(data)] = data
                    assert c.pread(len(data), off) == data
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    dev.flush()
    dev.close()
    assert qemu_read(img, pw, tmp_path / "q.raw") == model


def test_flush_trim_close_passthrough(volume_bytes):
    backing = CountingDevice(bytearray(volume_bytes))
    header = CountingDevice(bytearray(volume_bytes))
    dev = LuksDevice(backing, writable=True, passphrase=PASSPHRASE)
    dev.pwrite(b"x" * 1000, 10)
    dev.flush()
    assert backing.flushes == 1
    dev.trim(5000, 100)  # whole sectors inside [100, 5100) only: [512, 4608)
    assert backing.trims == [(dev.payload_offset + 512, 4096)]
    assert not dev.can_extents and list(dev.extents(dev.size, 0))[0].zero is False
    clone = dev.clone()
    clone.close()
    assert backing.closed_count == 0  # a clone closes its own backing clone only
    dev.close()
    assert backing.closed_count == 1
    # a detached header device is owned too
    det = LuksDevice(CountingDevice(bytearray(volume_bytes)), header=header, passphrase=PASSPHRASE)
    det.close()
    assert header.closed_count == 1


def test_read_only_rules(volume_bytes):
    dev = LuksDevice(MemoryDevice(bytearray(volume_bytes)), passphrase=PASSPHRASE)
    assert dev.readonly
    with pytest.raises(ReadOnlyError):
        dev.pwrite(b"x", 0)
    with pytest.raises(OutOfRangeError):
        dev.pread(10, dev.size - 5)
    with pytest.raises(ReadOnlyError):
        LuksDevice(MemoryDevice(bytearray(volume_bytes), writable=False), passphrase=PASSPHRASE, writable=True)
    # a read never writes
    ro = MemoryDevice(bytearray(volume_bytes), writable=False)
    with LuksDevice(ro, passphrase=PASSPHRASE) as d:
        d.pread(d.size, 0)
        d.pread(3, 1000)


def test_partial_sector_writes_keep_neighbours(volume_bytes):
    mem = MemoryDevice(bytearray(volume_bytes))
    dev = LuksDevice(mem, passphrase=PASSPHRASE, writable=True)
    base = random_bytes(4096, 1)
    dev.pwrite(base, 0)
    model = bytearray(base)
    for off, length in [(0, 1), (511, 2), (100, 300), (1000, 1100), (4095, 1), (513, 510)]:
        data = random_bytes(length, off)
        dev.pwrite(data, off)
        model[off : off + length] = data
    assert dev.pread(4096, 0) == model
    # independent check of the ciphertext: decrypt the raw sectors with the volume key
    hdr, key = unlock(mem, passphrase=PASSPHRASE)
    from imageformats.luks1 import SectorCipher

    raw = bytearray(mem.data[hdr.payload_offset * 512 : hdr.payload_offset * 512 + 4096])
    SectorCipher(hdr.cipher_name, hdr.cipher_mode, key).decrypt_into(raw, 0)
    assert raw == model


def test_no_secrets_in_repr_info_or_errors(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "s.luks"
    cs_format(img, pw, size=3 * MiB)
    dev = detect.open(str(img), passphrase=PASSPHRASE)
    _, key = unlock(FileDevice(img), passphrase=PASSPHRASE)
    texts = [repr(dev), str(dev), json.dumps(dev.layer_info()), repr(dev.cipher), repr(dev.header)]
    proc = run("python3", "-m", "imageformats", "info", "--output", "json", "--passphrase-file", pw, img)
    texts.append(proc.stdout.decode() + proc.stderr.decode())
    bad = run("python3", "-m", "imageformats", "info", "--passphrase-file", tmp_path / "nope", img, check=False)
    texts.append(bad.stdout.decode() + bad.stderr.decode())
    wrong = secret_file(tmp_path, b"wrong-passphrase-text", "wrong")
    bad = run("python3", "-m", "imageformats", "info", "--passphrase-file", wrong, img, check=False)
    assert bad.returncode == 5
    texts.append(bad.stdout.decode() + bad.stderr.decode())
    for t in texts:
        assert PASSPHRASE.decode() not in t
        assert "wrong-passphrase-text" not in t
        assert key.hex() not in t and key.hex(" ") not in t
    dev.close()
    assert json.loads(proc.stdout)["layers"][0]["cipher"] == "aes-xts-plain64"


def test_registered_format(volume_bytes):
    fmt = detect.formats()["luks"]
    assert fmt.kind == "crypto" and fmt.needs_secret
    assert "luks" in detect.outputs()
    with detect.open(MemoryDevice(bytearray(volume_bytes)), passphrase=PASSPHRASE) as dev:
        assert dev.format_name == "luks"
        assert isinstance(dev.backing, BlockDevice)


def test_backing_errors_surface(volume_bytes):
    """An EIO in the payload is reported, never turned into (wrongly decrypted) data; the header still opens."""
    from imageformats.errors import DeviceIOError
    from imageformats.testing.evil import EvilDevice

    mem = MemoryDevice(bytearray(volume_bytes))
    off = LuksDevice(mem.clone(), passphrase=PASSPHRASE).payload_offset
    with LuksDevice(EvilDevice(mem, eio=((off + 8192, 512),)), passphrase=PASSPHRASE) as dev:
        assert dev.pread(8192, 0) == LuksDevice(mem.clone(), passphrase=PASSPHRASE).pread(8192, 0)
        with pytest.raises(DeviceIOError):
            dev.pread(100, 8200)

