"""Find a partition's byte range in a raw disk image (MBR, or GPT behind a protective MBR).

Used by ``partial-deflate --partition N``.  Partition numbers are 1-based, as
``sfdisk`` and Linux number them (GPT entry N, or MBR primary entry N).
"""

from __future__ import annotations

import struct

from ..errors import CorruptImageError, InvalidArgumentError

SECTOR = 512
MAX_GPT_ENTRIES = 1024


def partition_range(dev, number: int) -> tuple[int, int]:
    """(start, end) in bytes of partition ``number`` of the disk on ``dev``."""
    if number < 1:
        raise InvalidArgumentError("partition numbers start at 1")
    if dev.size < 2 * SECTOR:
        raise InvalidArgumentError("image too small to hold a partition table")
    mbr = dev.pread(SECTOR, 0)
    if mbr[510:512] != b"\x55\xaa":
        raise InvalidArgumentError("image has no MBR/GPT partition table (no 55 AA signature)")
    entries = [struct.unpack_from("<4xB3xII", mbr, 446 + 16 * i) for i in range(4)]
    if any(t == 0xEE for t, _, _ in entries):
        return _gpt(dev, number)
    if number > 4:
        raise InvalidArgumentError(f"MBR partition {number}: only primary partitions 1-4 are supported")
    ptype, lba, count = entries[number - 1]
    if ptype == 0 or count == 0:
        raise InvalidArgumentError(f"MBR partition {number} does not exist")
    return _check(dev, lba * SECTOR, (lba + count) * SECTOR, number)


def _gpt(dev, number: int) -> tuple[int, int]:
    hdr = dev.pread(92, SECTOR)
    if hdr[:8] != b"EFI PART":
        raise CorruptImageError("protective MBR but no GPT header at LBA 1")
    entries_lba, nentries, esize = struct.unpack_from("<QII", hdr, 72)
    if esize < 128 or esize > 4096 or nentries > MAX_GPT_ENTRIES:
        raise CorruptImageError("GPT header has an implausible partition entry array")
    if number > nentries:
        raise InvalidArgumentError(f"GPT partition {number} does not exist (the table has {nentries} entries)")
    off = entries_lba * SECTOR + (number - 1) * esize
    if off + esize > dev.size:
        raise CorruptImageError("GPT partition entry array lies outside the image")
    ent = dev.pread(esize, off)
    if ent[:16] == bytes(16):
        raise InvalidArgumentError(f"GPT partition {number} does not exist (empty entry)")
    first, last = struct.unpack_from("<QQ", ent, 32)
    return _check(dev, first * SECTOR, (last + 1) * SECTOR, number)


def _check(dev, start: int, end: int, number: int) -> tuple[int, int]:
    if not 0 <= start < end <= dev.size:
        raise CorruptImageError(f"partition {number} [{start}, {end}) lies outside the {dev.size}-byte image")
    return start, end
