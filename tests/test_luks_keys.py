"""Key management: crash safety at every write (and torn sectors), checked with cryptsetup; the rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageformats.block import MemoryDevice
from imageformats.errors import InvalidArgumentError, WrongPassphraseError
from imageformats.luks1 import add_key, change_key, kill_slot, luks_format, read_header, remove_key, unlock
from luks_tools import PASSPHRASE, cs_dump_fields, cs_test_passphrase, secret_file

MiB = 1 << 20
FLUSH = None


class RecordingDevice(MemoryDevice):
    """A MemoryDevice that logs every write and flush, to replay crashes at any point."""

    def __init__(self, data: bytes):
        super().__init__(bytearray(data))
        self.log: list = []

    def _pwrite(self, buf, offset):
        self.log.append((offset, bytes(buf)))
        super()._pwrite(buf, offset)

    def flush(self):
        self.log.append(FLUSH)


def crash_states(initial: bytes, log: list) -> list[tuple[str, bytes]]:
    """Every state a crash can leave: each prefix of the writes, plus torn versions of the next write.

    Writes are separated by flushes, so a crash loses at most the write in flight; a write may
    land partly (any of its 512-byte sectors for a header write, the first half for key material).
    """
    writes = [w for w in log if w is not FLUSH]
    flushes_between = all(log[i + 1] is FLUSH for i, w in enumerate(log) if w is not FLUSH)
    assert flushes_between, "every write must be followed by a flush"
    states = []
    img = bytearray(initial)
    for k, (offset, data) in enumerate(writes):
        states.append((f"before write {k}", bytes(img)))
        nsec = -(-len(data) // 512)
        if nsec <= 2:
            for s in range(nsec):
                torn = bytearray(img)
                piece = data[s * 512 : (s + 1) * 512]
                torn[offset + s * 512 : offset + s * 512 + len(piece)] = piece
                states.append((f"write {k} torn: only sector {s}", bytes(torn)))
        else:
            torn = bytearray(img)
            half = (nsec // 2) * 512
            torn[offset : offset + half] = data[:half]
            states.append((f"write {k} torn: first half", bytes(torn)))
        img[offset : offset + len(data)] = data
    states.append(("after the last write", bytes(img)))
    return states


def _cs_opens(tmp: Path, image: bytes, keyfile: Path) -> bool:
    path = tmp / "state.img"
    path.write_bytes(image)
    return cs_test_passphrase(path, keyfile)


@pytest.fixture
def volume(tmp_path):
    """A LUKS1 volume in memory: PASSPHRASE in slot 0, b'six' in slot 6 (which straddles sectors 0 and 1)."""
    mem = MemoryDevice(2 * MiB + 4096)
    luks_format(mem, PASSPHRASE, iterations=1000)
    add_key(mem, b"six", passphrase=PASSPHRASE, new_slot=6, iterations=1000)
    files = {
        "pw": secret_file(tmp_path, PASSPHRASE, "pw"),
        "six": secret_file(tmp_path, b"six", "six"),
        "new": secret_file(tmp_path, b"brand new", "new"),
    }
    return bytes(mem.data), files


def test_add_key_crash_safe(tmp_path, volume):
    initial, f = volume
    dev = RecordingDevice(initial)
    remove_key(dev, passphrase=b"six")  # free slot 6 again, then add into it under observation
    initial = bytes(dev.data)
    dev = RecordingDevice(initial)
    slot = add_key(dev, b"brand new", passphrase=PASSPHRASE, new_slot=6, iterations=1000)
    assert slot == 6
    states = crash_states(initial, dev.log)
    assert len(states) >= 6
    for what, image in states:
        assert _cs_opens(tmp_path, image, f["pw"]), what
    assert _cs_opens(tmp_path, states[-1][1], f["new"])


def test_change_key_crash_safe(tmp_path, volume):
    initial, f = volume
    dev = RecordingDevice(initial)
    old, new = change_key(dev, b"brand new", passphrase=b"six", iterations=1000)
    assert (old, new) == (6, 1)
    for what, image in crash_states(initial, dev.log):
        assert _cs_opens(tmp_path, image, f["pw"]), what  # the other slot is never touched
        assert _cs_opens(tmp_path, image, f["six"]) or _cs_opens(tmp_path, image, f["new"]), what
    final = bytes(dev.data)
    assert _cs_opens(tmp_path, final, f["new"]) and not _cs_opens(tmp_path, final, f["six"])


def test_remove_and_kill_crash_safe(tmp_path, volume):
    initial, f = volume
    dev = RecordingDevice(initial)
    assert remove_key(dev, passphrase=b"six") == 6
    for what, image in crash_states(initial, dev.log):
        assert _cs_opens(tmp_path, image, f["pw"]), what
    dev = RecordingDevice(initial)
    kill_slot(dev, 0, passphrase=b"six")
    for what, image in crash_states(initial, dev.log):
        assert _cs_opens(tmp_path, image, f["six"]), what
    assert not _cs_opens(tmp_path, bytes(dev.data), f["pw"])
    # the revoked slot's key material is overwritten, not just disabled
    hdr = read_header(MemoryDevice(initial))
    start = hdr.key_slots[0].key_material_offset * 512
    assert dev.data[start : start + 256000] != initial[start : start + 256000]


def test_last_slot_rules(tmp_path, volume):
    initial, f = volume
    dev = MemoryDevice(bytearray(initial))
    with pytest.raises(WrongPassphraseError):
        kill_slot(dev, 6, passphrase=b"six")  # a slot's own passphrase does not authorise killing it
    with pytest.raises(InvalidArgumentError, match="needs the passphrase"):
        kill_slot(dev, 6)
    kill_slot(dev, 6, passphrase=PASSPHRASE)
    with pytest.raises(InvalidArgumentError, match="last active key slot"):
        remove_key(dev, passphrase=PASSPHRASE)
    with pytest.raises(InvalidArgumentError, match="last active key slot"):
        kill_slot(dev, 0, passphrase=PASSPHRASE)
    with pytest.raises(InvalidArgumentError, match="not active"):
        kill_slot(dev, 6, force=True)
    remove_key(dev, passphrase=PASSPHRASE, force_last=True)
    path = tmp_path / "dead.img"
    path.write_bytes(dev.data)
    assert not any(s["enabled"] for s in cs_dump_fields(path)["slots"].values())
    with pytest.raises(WrongPassphraseError):
        unlock(dev, passphrase=PASSPHRASE)


def test_full_table(tmp_path, volume):
    initial, f = volume
    dev = MemoryDevice(bytearray(initial))
    for i in range(6):
        add_key(dev, b"k%d" % i, passphrase=PASSPHRASE, iterations=1000)
    assert read_header(dev).active_slots() == list(range(8))
    with pytest.raises(InvalidArgumentError, match="all 8"):
        add_key(dev, b"one too many", passphrase=PASSPHRASE, iterations=1000)
    with pytest.raises(InvalidArgumentError, match="already in use"):
        add_key(dev, b"x", passphrase=PASSPHRASE, new_slot=3, iterations=1000)
    # with no free slot, change-key rewrites the slot in place; the 7 others stay usable
    assert change_key(dev, b"brand new", passphrase=b"six", iterations=1000) == (6, 6)
    path = tmp_path / "full.img"
    path.write_bytes(dev.data)
    assert cs_test_passphrase(path, f["new"]) and cs_test_passphrase(path, f["pw"])
    assert not cs_test_passphrase(path, f["six"])


def test_wrong_secrets(volume):
    initial, _ = volume
    dev = MemoryDevice(bytearray(initial))
    with pytest.raises(WrongPassphraseError):
        add_key(dev, b"x", passphrase=b"nope", iterations=1000)
    with pytest.raises(WrongPassphraseError):
        change_key(dev, b"x", passphrase=b"nope", iterations=1000)
    with pytest.raises(WrongPassphraseError):
        remove_key(dev, passphrase=b"nope")
    with pytest.raises(InvalidArgumentError):
        add_key(dev, b"x", passphrase=PASSPHRASE, iterations=10)  # below the 1000 floor
    assert bytes(dev.data) == initial  # nothing was written


def test_iteration_benchmark(volume):
    """Without forced iterations the count comes from a PBKDF2 benchmark of the requested time."""
    initial, _ = volume
    dev = MemoryDevice(bytearray(initial))
    slot = add_key(dev, b"timed", passphrase=PASSPHRASE, iter_time_ms=50)
    iters = read_header(dev).key_slots[slot].iterations
    assert iters >= 1000
    import time

    t = time.perf_counter()
    unlock(dev, passphrase=b"timed", key_slot=slot)
    assert time.perf_counter() - t < 5.0
