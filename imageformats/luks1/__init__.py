"""LUKS1: unlock, random-access read/write, create and key management (cryptsetup/qemu compatible).

    from imageformats.luks1 import LuksDevice, unlock, SectorCipher
    hdr, volume_key = unlock(header_dev, passphrase=b"...")
    SectorCipher(hdr.cipher_name, hdr.cipher_mode, volume_key).decrypt_into(buf, first_sector)
    with LuksDevice(FileDevice("disk.luks"), passphrase=b"...") as dev: ...

Registers the ``luks`` format (kind ``crypto``) and the ``luks`` output for ``convert -O luks``.
See docs/luks1.md.
"""

from ..detect import Format, Output, register_format, register_output
from .create import (
    add_key,
    change_key,
    header_backup,
    header_restore,
    kill_slot,
    layout,
    luks_format,
    remove_key,
    set_uuid,
    write_luks,
)
from .device import LuksDevice, open_luks, probe_luks
from .header import KeySlot, LuksHeader, is_luks
from .keyslots import read_header, unlock, unlock_detailed
from .sectors import SECTOR_SIZE, SectorCipher

register_format(Format("luks", "crypto", probe_luks, open_luks, needs_secret=True))
register_output(Output("luks", write_luks, "LUKS1 volume (cryptsetup, qemu and nbdkit compatible)"))

__all__ = [
    "LuksDevice",
    "LuksHeader",
    "KeySlot",
    "SectorCipher",
    "SECTOR_SIZE",
    "unlock",
    "unlock_detailed",
    "read_header",
    "is_luks",
    "luks_format",
    "layout",
    "add_key",
    "remove_key",
    "kill_slot",
    "change_key",
    "header_backup",
    "header_restore",
    "set_uuid",
    "write_luks",
]
