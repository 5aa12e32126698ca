"""LUKS1 on-disk layout: the 592-byte partition header and its 8 key slots (construct), plus checks.

LUKS1 On-Disk Format Specification 1.2.3 (cryptsetup docs/on-disk-format.pdf): "PHDR layout"
(Figure 1) and "key slot layout" (Figure 2).  Everything is big-endian; strings are
NUL-padded ASCII; offsets are in 512-byte sectors.
"""

from __future__ import annotations

import dataclasses
import uuid as _uuid
from dataclasses import dataclass, field

from construct import Array, Bytes, Int16ub, Int32ub, Struct, StreamError

from ..errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError

MAGIC = b"LUKS\xba\xbe"
#: LUKS2 keeps the same magic at offset 0 (primary header) and "SKUL\xba\xbe" in its secondary header.
LUKS2_SECONDARY_MAGIC = b"SKUL\xba\xbe"
VERSION = 1
HEADER_SIZE = 592
SECTOR_SIZE = 512
NUM_KEYS = 8
STRIPES = 4000
SALT_SIZE = 32
DIGEST_SIZE = 20
UUID_SIZE = 40
KEY_ENABLED = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD
#: Key-slot areas start on 4096-byte boundaries (spec 1.2.3, "Clarification of keyslots alignment").
KEYSLOT_ALIGN = 4096
#: cryptsetup's default payload alignment: 1 MiB (2048 sectors).
DEFAULT_ALIGN_SECTORS = 2048
#: PBKDF2 floors cryptsetup enforces for LUKS1.
MIN_ITERATIONS = 1000
#: Largest volume key we accept (cryptsetup's limit is 512 bytes; AES-XTS needs at most 64).
MAX_KEY_BYTES = 512

# LUKS1 spec 1.2.3, Figure 2: key slot layout (48 bytes).
KeySlotStruct = Struct(
    "active" / Int32ub,
    "iterations" / Int32ub,
    "salt" / Bytes(SALT_SIZE),
    "key_material_offset" / Int32ub,
    "stripes" / Int32ub,
)

# LUKS1 spec 1.2.3, Figure 1: PHDR layout (592 bytes).
PhdrStruct = Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "cipher_name" / Bytes(32),
    "cipher_mode" / Bytes(32),
    "hash_spec" / Bytes(32),
    "payload_offset" / Int32ub,
    "key_bytes" / Int32ub,
    "mk_digest" / Bytes(DIGEST_SIZE),
    "mk_digest_salt" / Bytes(SALT_SIZE),
    "mk_digest_iter" / Int32ub,
    "uuid" / Bytes(UUID_SIZE),
    "key_slots" / Array(NUM_KEYS, KeySlotStruct),
)
assert PhdrStruct.sizeof() == HEADER_SIZE


def af_sectors(key_bytes: int, stripes: int = STRIPES) -> int:
    """Sectors the AF-split key material of one slot occupies (spec: "AF-Splitter")."""
    return (key_bytes * stripes + SECTOR_SIZE - 1) // SECTOR_SIZE


def is_luks(head: bytes) -> bool:
    """True when ``head`` starts with a LUKS1 header (magic and version 1)."""
    return len(head) >= 8 and head[:6] == MAGIC and head[6:8] == b"\x00\x01"


def luks_version(head: bytes) -> int | None:
    """The LUKS version number if ``head`` starts with the LUKS magic, else None."""
    if len(head) >= 8 and head[:6] == MAGIC:
        return int.from_bytes(head[6:8], "big")
    return None


@dataclass
class KeySlot:
    index: int
    active: bool
    iterations: int
    salt: bytes
    key_material_offset: int  # sectors
    stripes: int
    raw_active: int = KEY_DISABLED

    def material_sectors(self, key_bytes: int) -> int:
        return af_sectors(key_bytes, self.stripes)


@dataclass
class LuksHeader:
    """A parsed LUKS1 header.  Holds no secret: digests and salts are public on disk."""

    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # sectors, as on disk
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    key_slots: list[KeySlot] = field(default_factory=list)
    version: int = VERSION

    @property
    def cipher_spec(self) -> str:
        return f"{self.cipher_name}-{self.cipher_mode}"

    @property
    def payload_offset_bytes(self) -> int:
        return self.payload_offset * SECTOR_SIZE

    def active_slots(self) -> list[int]:
        return [s.index for s in self.key_slots if s.active]

    def keyslots_end(self) -> int:
        """First byte after the last key-material area (the header area a backup must hold)."""
        end = HEADER_SIZE
        for s in self.key_slots:
            end = max(end, (s.key_material_offset + s.material_sectors(self.key_bytes)) * SECTOR_SIZE)
        return end

    def copy(self) -> "LuksHeader":
        new = dataclasses.replace(self)
        new.key_slots = [dataclasses.replace(s) for s in self.key_slots]
        return new

    # -- bytes <-> header ----------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes) -> "LuksHeader":
        """Parse the first 592 bytes; CorruptImageError / UnsupportedFeatureError naming the problem."""
        if len(data) < 8 or data[:6] != MAGIC:
            raise CorruptImageError("not a LUKS device (bad magic)")
        version = int.from_bytes(data[6:8], "big")
        if version == 2:
            raise UnsupportedFeatureError("LUKS2 is not supported (only LUKS1)")
        if version != VERSION:
            raise UnsupportedFeatureError(f"LUKS version {version} is not supported (only LUKS1)")
        if len(data) < HEADER_SIZE:
            raise CorruptImageError(f"LUKS header is truncated ({len(data)} of {HEADER_SIZE} bytes)")
        try:
            c = PhdrStruct.parse(data[:HEADER_SIZE])
        except StreamError as exc:  # pragma: no cover - length checked above
            raise CorruptImageError(f"LUKS header cannot be parsed: {exc}") from None
        slots = []
        for i, ks in enumerate(c.key_slots):
            if ks.active not in (KEY_ENABLED, KEY_DISABLED):
                raise CorruptImageError(f"LUKS key slot {i} has an invalid state 0x{ks.active:08x}")
            slots.append(KeySlot(i, ks.active == KEY_ENABLED, ks.iterations, bytes(ks.salt),
                                 ks.key_material_offset, ks.stripes, ks.active))
        return cls(
            cipher_name=_text(c.cipher_name, "cipher name"),
            cipher_mode=_text(c.cipher_mode, "cipher mode"),
            hash_spec=_text(c.hash_spec, "hash spec"),
            payload_offset=c.payload_offset,
            key_bytes=c.key_bytes,
            mk_digest=bytes(c.mk_digest),
            mk_digest_salt=bytes(c.mk_digest_salt),
            mk_digest_iter=c.mk_digest_iter,
            uuid=_text(c.uuid, "UUID"),
            key_slots=slots,
            version=version,
        )

    def to_bytes(self) -> bytes:
        return PhdrStruct.build(
            dict(
                magic=MAGIC,
                version=self.version,
                cipher_name=_field(self.cipher_name, 32, "cipher name"),
                cipher_mode=_field(self.cipher_mode, 32, "cipher mode"),
                hash_spec=_field(self.hash_spec, 32, "hash spec"),
                payload_offset=self.payload_offset,
                key_bytes=self.key_bytes,
                mk_digest=self.mk_digest,
                mk_digest_salt=self.mk_digest_salt,
                mk_digest_iter=self.mk_digest_iter,
                uuid=_field(self.uuid, UUID_SIZE, "UUID"),
                key_slots=[
                    dict(
                        active=KEY_ENABLED if s.active else KEY_DISABLED,
                        iterations=s.iterations,
                        salt=s.salt,
                        key_material_offset=s.key_material_offset,
                        stripes=s.stripes,
                    )
                    for s in self.key_slots
                ],
            )
        )

    # -- consistency ---------------------------------------------------------------------

    def validate(self, header_device_size: int | None = None, data_device_size: int | None = None) -> None:
        """Raise CorruptImageError for an inconsistent header (cryptsetup's LUKS1 checks and more).

        ``header_device_size``: key material must lie inside it.  ``data_device_size``: the
        payload offset must lie inside it (the same device unless the header is detached).
        """
        kb = self.key_bytes
        if kb <= 0 or kb > MAX_KEY_BYTES:
            raise CorruptImageError(f"LUKS header has an invalid key size of {kb} bytes")
        if self.mk_digest_iter == 0:
            raise CorruptImageError("LUKS header has a master-key digest iteration count of 0")
        areas = []
        for s in self.key_slots:
            if s.stripes != STRIPES:
                raise CorruptImageError(f"LUKS key slot {s.index} has {s.stripes} AF stripes (LUKS1 uses {STRIPES})")
            if s.key_material_offset * SECTOR_SIZE < HEADER_SIZE:
                raise CorruptImageError(
                    f"LUKS key slot {s.index} key material (sector {s.key_material_offset}) overlaps the header"
                )
            if s.active and s.iterations == 0:
                raise CorruptImageError(f"LUKS key slot {s.index} is enabled with 0 PBKDF2 iterations")
            start = s.key_material_offset
            end = start + s.material_sectors(kb)
            if self.payload_offset and end > self.payload_offset:
                raise CorruptImageError(
                    f"LUKS key slot {s.index} key material (sectors {start}-{end - 1}) runs into the payload "
                    f"at sector {self.payload_offset}"
                )
            if header_device_size is not None and end * SECTOR_SIZE > header_device_size:
                raise CorruptImageError(
                    f"LUKS key slot {s.index} key material (ends at byte {end * SECTOR_SIZE}) lies outside "
                    f"the {header_device_size}-byte header device"
                )
            areas.append((start, end, s.index))
        areas.sort()
        for (s1, e1, i1), (s2, e2, i2) in zip(areas, areas[1:]):
            if s2 < e1:
                raise CorruptImageError(f"LUKS key slots {i1} and {i2} overlap")
        if data_device_size is not None and self.payload_offset * SECTOR_SIZE > data_device_size:
            raise CorruptImageError(
                f"LUKS payload offset (sector {self.payload_offset}) lies outside the {data_device_size}-byte device"
            )


def _text(raw: bytes, what: str) -> str:
    raw = bytes(raw).split(b"\0", 1)[0]
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptImageError(f"LUKS header {what} is not ASCII") from None
    if not text.isprintable():
        raise CorruptImageError(f"LUKS header {what} holds control characters")
    return text


def _field(text: str, size: int, what: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{what} {text!r} is not ASCII") from None
    if len(raw) >= size:
        raise InvalidArgumentError(f"{what} {text!r} is longer than {size - 1} characters")
    return raw.ljust(size, b"\0")


def new_uuid() -> str:
    return str(_uuid.uuid4())


def check_uuid(text: str) -> str:
    """Canonical form of a UUID given by the user (InvalidArgumentError otherwise)."""
    try:
        return str(_uuid.UUID(text))
    except ValueError:
        raise InvalidArgumentError(f"{text!r} is not a valid UUID") from None


__all__ = [
    "MAGIC", "VERSION", "HEADER_SIZE", "SECTOR_SIZE", "NUM_KEYS", "STRIPES", "SALT_SIZE", "DIGEST_SIZE",
    "KEY_ENABLED", "KEY_DISABLED", "KEYSLOT_ALIGN", "DEFAULT_ALIGN_SECTORS", "MIN_ITERATIONS",
    "KeySlotStruct", "PhdrStruct", "KeySlot", "LuksHeader", "af_sectors", "is_luks", "luks_version",
    "new_uuid", "check_uuid",
]
