"""LuksDevice: the decrypted payload of a LUKS1 volume as a random-access block device.

LUKS1 spec 1.2.3, "Payload": the bulk data starts at payload-offset sectors of the data device
(the same device as the header unless the header is detached) and sector n of the payload is
encrypted with IV sector n.  Reads and writes at any byte offset and length: partial sectors
are read, decrypted, patched and re-encrypted (read-modify-write).
"""

from __future__ import annotations

import threading
from typing import Any

from ..block import BlockDevice, MiB
from ..errors import CorruptImageError, ReadOnlyError
from .header import SECTOR_SIZE, LuksHeader
from .keyslots import read_header, unlock
from .sectors import SectorCipher

#: Bytes encrypted per step when writing (bounds the scratch copy of the caller's data).
_WRITE_CHUNK = 4 * MiB


class _Shared:
    """State shared by a device and its clones (never printed: holds the cipher)."""

    def __init__(self, header: LuksHeader, cipher: SectorCipher):
        self.header = header
        self.cipher = cipher
        self.rmw_lock = threading.Lock()  # partial-sector read-modify-write across clones
        self.local = threading.local()  # per-thread scratch buffer for writes

    def scratch(self, size: int) -> memoryview:
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self.local.buf = bytearray(size)
        return memoryview(buf)[:size]


class LuksDevice(BlockDevice):
    """The guest view of a LUKS1 volume on ``backing``.

        LuksDevice(backing, *, header=None, writable=False, passphrase=None, key_file=None,
                   volume_key=None, key_slot=None)

    ``header``: a separate device holding a detached header (the payload offset then counts
    from the start of ``backing``).  The device owns ``backing`` and ``header``: close()
    closes both.  Secrets: ``passphrase`` / ``key_file`` (bytes) tried on every active slot
    (or ``key_slot``), or ``volume_key``.
    """

    format_name = "luks"
    can_multi_conn = True

    def __init__(self, backing: BlockDevice, *, header: BlockDevice | None = None, writable: bool = False,
                 passphrase=None, key_file=None, volume_key=None, key_slot=None,
                 _shared: _Shared | None = None):
        self.backing = backing
        self.header_device = header
        if writable and backing.readonly:
            raise ReadOnlyError("cannot open the LUKS volume for writing: its backing device is read-only")
        if _shared is None:
            hdr_dev = header if header is not None else backing
            hdr, key = unlock(hdr_dev, passphrase=passphrase, key_file=key_file,
                              volume_key=volume_key, key_slot=key_slot)
            _shared = _Shared(hdr, SectorCipher(hdr.cipher_name, hdr.cipher_mode, key))
            del key
        self._shared = _shared
        hdr = _shared.header
        self._offset = hdr.payload_offset * SECTOR_SIZE
        if header is None and self._offset < hdr.keyslots_end():
            # payload offset 0 only makes sense with a detached header: writes would destroy the key slots
            raise CorruptImageError(
                f"LUKS payload (sector {hdr.payload_offset}) overlaps the header and key slots of the same device"
            )
        if self._offset > backing.size:
            raise CorruptImageError(
                f"LUKS payload offset ({self._offset} bytes) lies past the end of the {backing.size}-byte device"
            )
        self.size = (backing.size - self._offset) // SECTOR_SIZE * SECTOR_SIZE
        self.readonly = not writable
        self.block_size = (SECTOR_SIZE, max(4096, backing.block_size[1]), backing.block_size[2])
        self.can_trim = backing.can_trim
        self.can_multi_conn = backing.can_multi_conn

    # -- public details --------------------------------------------------------------------

    @property
    def header(self) -> LuksHeader:
        return self._shared.header

    @property
    def cipher(self) -> SectorCipher:
        return self._shared.cipher

    @property
    def payload_offset(self) -> int:
        """Byte offset of the payload in the backing device."""
        return self._offset

    def layer_info(self) -> dict[str, Any]:
        hdr = self.header
        info: dict[str, Any] = {
            "cipher": hdr.cipher_spec,
            "key-bits": hdr.key_bytes * 8,
            "hash": hdr.hash_spec,
            "payload-offset": self._offset,
            "uuid": hdr.uuid,
            "active-key-slots": hdr.active_slots(),
        }
        if self.header_device is not None:
            info["detached-header"] = True
        return info

    # -- I/O -------------------------------------------------------------------------------

    def _readinto(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        first = offset // SECTOR_SIZE
        a = -(-offset // SECTOR_SIZE) * SECTOR_SIZE  # first aligned byte
        b = end // SECTOR_SIZE * SECTOR_SIZE  # last aligned byte
        if a >= b:  # inside one or two sectors without a whole one: go through a bounce buffer
            lo = first * SECTOR_SIZE
            hi = -(-end // SECTOR_SIZE) * SECTOR_SIZE
            tmp = bytearray(hi - lo)
            self._read_sectors(memoryview(tmp), lo)
            buf[:] = memoryview(tmp)[offset - lo : end - lo]
            return
        if a > offset:
            tmp = bytearray(SECTOR_SIZE)
            self._read_sectors(memoryview(tmp), a - SECTOR_SIZE)
            buf[: a - offset] = memoryview(tmp)[SECTOR_SIZE - (a - offset) :]
        self._read_sectors(buf[a - offset : b - offset], a)
        if b < end:
            tmp = bytearray(SECTOR_SIZE)
            self._read_sectors(memoryview(tmp), b)
            buf[b - offset :] = memoryview(tmp)[: end - b]

    def _read_sectors(self, buf: memoryview, offset: int) -> None:
        self.backing.readinto(buf, self._offset + offset)
        self._shared.cipher.decrypt_into(buf, offset // SECTOR_SIZE)

    def _write_sectors(self, data: memoryview, offset: int) -> None:
        cipher = self._shared.cipher
        step = min(_WRITE_CHUNK, len(data))
        tmp = self._shared.scratch(step)
        for pos in range(0, len(data), step):
            n = min(step, len(data) - pos)
            view = tmp[:n]
            view[:] = data[pos : pos + n]  # never encrypt the caller's buffer in place
            cipher.encrypt_into(view, (offset + pos) // SECTOR_SIZE)
            self.backing.pwrite(view, self._offset + offset + pos)

    def _patch_sector(self, sector_start: int, data: memoryview, at: int) -> None:
        with self._shared.rmw_lock:
            tmp = bytearray(SECTOR_SIZE)
            self._read_sectors(memoryview(tmp), sector_start)
            tmp[at : at + len(data)] = data
            self._write_sectors(memoryview(tmp), sector_start)

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        a = -(-offset // SECTOR_SIZE) * SECTOR_SIZE
        b = end // SECTOR_SIZE * SECTOR_SIZE
        if a >= b:
            # no whole sector: patch the one or two sectors touched
            pos = offset
            while pos < end:
                s = pos // SECTOR_SIZE * SECTOR_SIZE
                n = min(end, s + SECTOR_SIZE) - pos
                self._patch_sector(s, buf[pos - offset : pos - offset + n], pos - s)
                pos += n
            return
        if a > offset:
            self._patch_sector(a - SECTOR_SIZE, buf[: a - offset], SECTOR_SIZE - (a - offset))
        self._write_sectors(buf[a - offset : b - offset], a)
        if b < end:
            self._patch_sector(b, buf[b - offset :], 0)

    def _trim(self, length: int, offset: int) -> None:
        # Advisory: pass whole sectors down (their content afterwards is unspecified, as in dm-crypt).
        a = -(-offset // SECTOR_SIZE) * SECTOR_SIZE
        b = (offset + length) // SECTOR_SIZE * SECTOR_SIZE
        if b > a and self.backing.can_trim:
            self.backing.trim(b - a, self._offset + a)

    def flush(self) -> None:
        self._check_open()
        self.backing.flush()

    def clone(self) -> "LuksDevice":
        self._check_open()
        header = self.header_device.clone() if self.header_device is not None else None
        return LuksDevice(self.backing.clone(), header=header, writable=not self.readonly, _shared=self._shared)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.backing.close()
            finally:
                if self.header_device is not None:
                    self.header_device.close()


def open_luks(dev: BlockDevice, writable: bool, options: dict[str, Any]) -> LuksDevice:
    """Opener for the format registry: takes the secrets it knows from ``options``."""
    header = options.get("luks_header")
    if header is not None and not isinstance(header, BlockDevice):
        from ..block import FileDevice

        header = FileDevice(header, writable=writable)
    return LuksDevice(
        dev,
        header=header,
        writable=writable,
        passphrase=options.get("passphrase"),
        key_file=options.get("key_file"),
        volume_key=options.get("volume_key"),
        key_slot=options.get("key_slot"),
    )


def probe_luks(head: bytes, dev: BlockDevice) -> bool:
    # LUKS1 and LUKS2 share the magic; opening a LUKS2 volume then says "LUKS2 is not supported".
    return head[:6] == b"LUKS\xba\xbe"


__all__ = ["LuksDevice", "open_luks", "probe_luks", "read_header"]
