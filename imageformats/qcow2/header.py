"""qcow2 on-disk layout: construct Structs and bit-layout constants only.

Spec: qemu ``docs/interop/qcow2.rst``.  Every number is big-endian.  Code that
interprets these structures lives in ``tables.py`` / ``device.py`` (reading) and
``writer.py`` (writing); nothing else knows qcow2's bytes.
"""

from __future__ import annotations

from construct import (
    Bytes,
    Const,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64sb,
    Int64ub,
    Padding,
    Struct,
    this,
)

# -- "Header" ---------------------------------------------------------------------

MAGIC = b"QFI\xfb"
HEADER_V2_LENGTH = 72  # "For version 2, the header is exactly 72 bytes"
HEADER_V3_MIN_LENGTH = 104  # "For version 3 ... at least 104 bytes"
HEADER_V3_LENGTH = 112  # 104 + compression_type (1 byte) + padding to 8, as qemu writes it
COMPRESSION_TYPE_OFFSET = 104  # "Additional fields": byte 104

MIN_CLUSTER_BITS = 9  # cluster_bits "Must not be less than 9"
MAX_CLUSTER_BITS = 21  # qemu's implementation limit: 2 MiB clusters
MIN_CLUSTER_BITS_EXTENDED_L2 = 14  # "if the image has Extended L2 Entries then cluster_bits must be at least 14"
MAX_BACKING_FILE_NAME = 1023  # backing_file_size "Must not be longer than 1023 bytes"
MAX_L1_BYTES = 32 * 1024 * 1024  # qemu implementation limit on the L1 table size
MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024  # qemu implementation limit on the refcount table size
DEFAULT_REFCOUNT_ORDER = 4  # "For version 2 images, the order is always assumed to be 4"
MAX_REFCOUNT_ORDER = 6  # "This value may not exceed 6"

# crypt_method
CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# compression_type (header byte 104)
COMPRESSION_DEFLATE = 0  # called "zlib" in qemu; raw deflate, no zlib header
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "zlib", COMPRESSION_ZSTD: "zstd"}
#: qemu compresses deflate clusters with a 4 KiB window (windowBits -12); reading accepts any window.
DEFLATE_WBITS = -12

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file", 3: "compression type",
                  4: "extended L2 entries"}

# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPAT_NAMES = {0: "lazy refcounts"}

# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

# Feature name table "Type of feature"
FEATURE_TYPE_INCOMPAT = 0
FEATURE_TYPE_COMPAT = 1
FEATURE_TYPE_AUTOCLEAR = 2

#: The header, version 2 fields then the version 3 fields (absent, i.e. None, for version 2).
#: ``compression_type`` is present only when header_length > 104; the rest up to header_length is padding.
Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
    # version 3
    "incompatible_features" / If(this.version >= 3, Int64ub),
    "compatible_features" / If(this.version >= 3, Int64ub),
    "autoclear_features" / If(this.version >= 3, Int64ub),
    "refcount_order" / If(this.version >= 3, Int32ub),
    "header_length" / If(this.version >= 3, Int32ub),
    # "Additional fields": byte 104 (present when header_length > 104)
    "compression_type" / If(lambda ctx: ctx.version >= 3 and (ctx.header_length or 0) > 104, Int8ub),
)

#: Byte offsets of header fields that are rewritten in place.
OFF_INCOMPATIBLE_FEATURES = 72
OFF_COMPATIBLE_FEATURES = 80
OFF_AUTOCLEAR_FEATURES = 88
OFF_L1_SIZE = 36
OFF_L1_TABLE_OFFSET = 40
OFF_REFCOUNT_TABLE_OFFSET = 48
OFF_REFCOUNT_TABLE_CLUSTERS = 56

# -- "Header extensions" --------------------------------------------------------------

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXT_NAMES = {
    EXT_BACKING_FORMAT: "backing format",
    EXT_FEATURE_NAMES: "feature name table",
    EXT_BITMAPS: "bitmaps",
    EXT_CRYPTO_HEADER: "full disk encryption header pointer",
    EXT_DATA_FILE: "external data file",
}

#: Extension header; data follows, padded to a multiple of 8.
ExtensionHeader = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)
EXTENSION_HEADER_SIZE = 8

#: "Feature name table" entry (48 bytes each).
FeatureNameEntry = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / Bytes(46),
)
FEATURE_NAME_ENTRY_SIZE = 48

#: "Full disk encryption header pointer" extension data.
CryptoHeaderExtension = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

#: "Bitmaps extension" data.
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    Padding(4),
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

# -- "Host cluster management": refcount table / blocks ------------------------------------

#: Refcount table entry, bits 9-63: offset of the refcount block.
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# -- "Cluster mapping": L1 / L2 entries ---------------------------------------------------

#: L1 entry bits 9-55: offset of the L2 table; bit 63: refcount is exactly one.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_COPIED = 1 << 63
L1E_RESERVED_MASK = 0x7F000000000001FF

#: L2 entry: bit 62 compressed, bit 63 "copied" (refcount exactly one).
L2E_COMPRESSED = 1 << 62
L2E_COPIED = 1 << 63
#: Standard cluster descriptor: bit 0 reads-as-zero, bits 9-55 host cluster offset.
L2E_ZERO = 1 << 0
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
L2_ENTRY_SIZE = 8
L2_EXTENDED_ENTRY_SIZE = 16  # "Extended L2 Entries": 128 bits


def compressed_layout(cluster_bits: int) -> tuple[int, int, int]:
    """(offset_mask, csize_shift, csize_mask) of the "Compressed Clusters Descriptor".

    x = 62 - (cluster_bits - 8): bits 0..x-1 host offset, bits x..61 additional 512-byte sectors.
    """
    csize_shift = 62 - (cluster_bits - 8)
    csize_mask = (1 << (cluster_bits - 8)) - 1
    offset_mask = (1 << csize_shift) - 1
    return offset_mask, csize_shift, csize_mask


COMPRESSED_SECTOR_SIZE = 512

#: "Extended L2 Entries": 32 subclusters; bitmap bits 0-31 allocated, 32-63 reads-as-zero.
SUBCLUSTERS_PER_CLUSTER = 32
SUBCLUSTER_ALLOC_MASK = 0x00000000FFFFFFFF
SUBCLUSTER_ZERO_SHIFT = 32

# -- "Snapshots" ------------------------------------------------------------------------

#: Snapshot table entry; the whole entry is padded to a multiple of 8 (see snapshot_entry_size).
SnapshotEntry = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
    "extra_data" / Bytes(this.extra_data_size),
    "id_str" / Bytes(this.id_str_size),
    "name" / Bytes(this.name_size),
)
SNAPSHOT_ENTRY_FIXED_SIZE = 40

#: Snapshot "Extra data" (each field present only when extra_data_size covers it).
SnapshotExtra = Struct(
    "vm_state_size_large" / Int64ub,  # bytes 40-47
    "disk_size" / Int64ub,  # bytes 48-55
    "icount" / Int64sb,  # bytes 56-63, -1 when disabled
)
SNAPSHOT_EXTRA_V3_MIN = 16  # "Version 3 images must include extra data at least up to byte 55"
MAX_SNAPSHOTS = 65536  # qemu's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA = 1024  # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA


def snapshot_entry_size(extra_data_size: int, id_str_size: int, name_size: int) -> int:
    """Bytes one snapshot table entry occupies, padding to a multiple of 8 included."""
    n = SNAPSHOT_ENTRY_FIXED_SIZE + extra_data_size + id_str_size + name_size
    return (n + 7) & ~7
