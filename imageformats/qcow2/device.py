"""Qcow2Device: a qcow2 image as a block device (reading everything qemu writes; in-place writing).

Spec: qemu ``docs/interop/qcow2.rst``; each piece of code names the section it implements.
"""

from __future__ import annotations

import os
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import zstandard

from ..block import BlockDevice, Extent, FileDevice, SliceDevice
from ..errors import (
    CorruptImageError,
    DeviceIOError,
    ImageFormatError,
    InvalidArgumentError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from . import header as H
from . import tables as T

#: Deepest backing chain opened (a guard against hostile chains).
MAX_BACKING_DEPTH = 32
#: Default bound of the L2 table cache, bytes (shared by clones).
DEFAULT_L2_CACHE = 32 * 1024 * 1024
#: Bound of the decompressed-cluster cache, bytes.
DEFAULT_COMPRESSED_CACHE = 8 * 1024 * 1024
#: L1 entries read per L1 cache block.
L1_BLOCK_ENTRIES = 8192
#: Compressed clusters in one read before decompression goes to the thread pool.
PARALLEL_DECOMPRESS_MIN = 4
#: Gap (bytes) between compressed clusters still read in one backing request.
COMPRESSED_READ_GAP = 64 * 1024

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _decompress_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="qcow2-z")
        return _pool


def _leaf_path(dev: BlockDevice) -> str | None:
    for layer in dev.layers():
        path = getattr(layer, "path", None)
        if isinstance(layer, FileDevice) and path:
            return os.path.realpath(path)
    return None


class _Image:
    """State shared by a device and its clones: parsed header, caches, the metadata lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()


class Qcow2Device(BlockDevice):
    """A qcow2 image over ``backing`` (the device holding the qcow2 file).

    Options (all optional): ``base_dir`` (directory for relative backing/data-file
    names), ``snapshot`` (open an internal snapshot by id or name, read-only),
    ``backing_image`` (a device to use instead of opening the backing file named
    in the header; ``False`` opens no backing image at all), ``data_file`` (a
    device for the external data file), ``l2_cache_size`` (bytes), and the
    secrets ``passphrase`` / ``key_file`` / ``volume_key`` / ``key_slot`` for LUKS.
    """

    format_name = "qcow2"
    can_extents = True

    def __init__(self, backing: BlockDevice, *, writable: bool = False, options: dict[str, Any] | None = None):
        self.backing = backing
        self.backing_image: BlockDevice | None = None
        self.data_dev: BlockDevice | None = None
        self._cipher = None
        options = dict(options or {})
        img = _Image()
        self._img = img
        try:
            self._open(options, writable)
        except BaseException:
            self._close_children(close_backing=False)
            raise

    # ------------------------------------------------------------------ opening

    def _open(self, options: dict[str, Any], writable: bool) -> None:
        img = self._img
        dev = self.backing
        fsize = dev.size
        if fsize < H.HEADER_V2_LENGTH:
            raise CorruptImageError(f"qcow2 image is truncated: {fsize} bytes, smaller than the 72-byte header")
        head = dev.pread(min(fsize, 4096), 0)
        try:
            hdr = H.Header.parse(head)
        except Exception as exc:  # construct raises many classes
            raise CorruptImageError(f"not a qcow2 header: {exc.__class__.__name__}") from None
        img.header = hdr
        # "Header": version, cluster_bits, header_length, refcount_order
        if hdr.version not in (2, 3):
            raise UnsupportedFeatureError(f"qcow2 version {hdr.version} (only versions 2 and 3 exist)")
        if not H.MIN_CLUSTER_BITS <= hdr.cluster_bits <= H.MAX_CLUSTER_BITS:
            raise CorruptImageError(f"qcow2 cluster_bits {hdr.cluster_bits} outside 9..21 (512 B to 2 MiB clusters)")
        cb = img.cluster_bits = hdr.cluster_bits
        cs = img.cluster_size = 1 << cb
        img.version = hdr.version
        if hdr.version == 2:
            img.header_length = H.HEADER_V2_LENGTH
            img.incompat = img.compat = img.autoclear = 0
            img.refcount_order = H.DEFAULT_REFCOUNT_ORDER
            img.compression_type = H.COMPRESSION_DEFLATE
        else:
            img.header_length = hdr.header_length
            if hdr.header_length < H.HEADER_V3_MIN_LENGTH or hdr.header_length % 8 or hdr.header_length > cs:
                raise CorruptImageError(f"qcow2 header_length {hdr.header_length} is invalid")
            img.incompat = hdr.incompatible_features
            img.compat = hdr.compatible_features
            img.autoclear = hdr.autoclear_features
            img.refcount_order = hdr.refcount_order
            img.compression_type = hdr.compression_type or 0
        if img.refcount_order > H.MAX_REFCOUNT_ORDER:
            raise CorruptImageError(f"qcow2 refcount_order {img.refcount_order} exceeds 6")
        # Header extensions come first: the feature name table names unknown bits.
        first_cluster = dev.pread(min(fsize, cs), 0) if fsize > len(head) and cs > len(head) else head[:cs]
        self._parse_extensions(first_cluster)
        unknown = img.incompat & ~H.INCOMPAT_KNOWN
        if unknown:
            names = []
            for bit in range(64):
                if unknown >> bit & 1:
                    label = img.feature_names.get((H.FEATURE_TYPE_INCOMPAT, bit))
                    names.append(f"bit {bit}" + (f" ({label})" if label else ""))
            raise UnsupportedFeatureError(f"qcow2 image uses unknown incompatible features: {', '.join(names)}")
        img.extended_l2 = bool(img.incompat & H.INCOMPAT_EXTL2)
        if img.extended_l2 and cb < H.MIN_CLUSTER_BITS_EXTENDED_L2:
            raise CorruptImageError("qcow2 extended L2 entries need clusters of at least 16 KiB")
        if bool(img.incompat & H.INCOMPAT_COMPRESSION) != (img.compression_type != 0):
            raise CorruptImageError("qcow2 compression type bit and compression_type field disagree")
        if img.compression_type not in H.COMPRESSION_NAMES:
            raise UnsupportedFeatureError(f"qcow2 compression type {img.compression_type}")
        img.dirty = bool(img.incompat & H.INCOMPAT_DIRTY)
        img.corrupt = bool(img.incompat & H.INCOMPAT_CORRUPT)
        img.has_data_file = bool(img.incompat & H.INCOMPAT_DATA_FILE)
        img.data_file_raw = bool(img.autoclear & H.AUTOCLEAR_DATA_FILE_RAW)
        img.lazy_refcounts = bool(img.compat & H.COMPAT_LAZY_REFCOUNTS)
        img.l2_entry_size = H.L2_EXTENDED_ENTRY_SIZE if img.extended_l2 else H.L2_ENTRY_SIZE
        img.l2_entries = cs // img.l2_entry_size
        img.unit_bits = cb - 5 if img.extended_l2 else cb
        img.l2_span = img.l2_entries * cs  # guest bytes one L2 table maps
        img.size = hdr.size
        img.crypt_method = hdr.crypt_method

        # "Header": writability
        if writable and img.corrupt:
            warnings.warn("qcow2 image is marked corrupt; opening it read-only", stacklevel=4)
            writable = False
        if writable and img.dirty:
            raise ReadOnlyError("qcow2 image is dirty (refcounts may be stale): repair it with 'qemu-img check -r all' before writing")
        if writable and img.autoclear & ~(H.AUTOCLEAR_BITMAPS | H.AUTOCLEAR_DATA_FILE_RAW):
            raise UnsupportedFeatureError("qcow2 image has unknown autoclear features; not writing it")

        # "Snapshots"
        img.snapshots = self._read_snapshot_table()
        l1_offset, l1_size = hdr.l1_table_offset, hdr.l1_size
        img.snapshot = None
        snap_name = options.get("snapshot")
        if snap_name is not None:
            snap = self._find_snapshot(str(snap_name))
            img.snapshot = snap
            l1_offset, l1_size = snap["l1_table_offset"], snap["l1_size"]
            if snap.get("disk_size") is not None:
                img.size = snap["disk_size"]
            writable = False
        self._set_l1(l1_offset, l1_size)

        # "Header": refcount table location (used by the writer and sanity checks)
        img.refcount_table_offset = hdr.refcount_table_offset
        img.refcount_table_clusters = hdr.refcount_table_clusters
        if hdr.refcount_table_offset % cs:
            raise CorruptImageError("qcow2 refcount table is not cluster-aligned")
        if hdr.refcount_table_clusters * cs > H.MAX_REFCOUNT_TABLE_BYTES:
            raise CorruptImageError(f"qcow2 refcount table of {hdr.refcount_table_clusters} clusters is too large")
        if hdr.refcount_table_clusters == 0 or hdr.refcount_table_offset == 0 or (
            hdr.refcount_table_offset + hdr.refcount_table_clusters * cs > fsize
        ):
            raise CorruptImageError("qcow2 refcount table lies outside the file")

        img.l2_cache = T.LRUCache(int(options.get("l2_cache_size", DEFAULT_L2_CACHE)))
        img.l1_cache = T.LRUCache(4 * L1_BLOCK_ENTRIES * 8 * 4)
        img.z_cache = T.LRUCache(DEFAULT_COMPRESSED_CACHE)

        # "External data file" (incompatible bit 2)
        if img.has_data_file:
            if img.snapshots:
                raise CorruptImageError("qcow2 image has both an external data file and internal snapshots")
            given = options.get("data_file")
            if isinstance(given, BlockDevice):
                self.data_dev = given
            else:
                if img.data_file_name is None:
                    raise UnsupportedFeatureError("qcow2 image uses an external data file but does not name it")
                path = self._resolve(img.data_file_name, options)
                self.data_dev = FileDevice(path, writable=writable)
        else:
            self.data_dev = self.backing
            if img.data_file_raw:
                raise CorruptImageError("qcow2 raw-external-data bit set without an external data file")

        # "Data encryption"
        img.iv_physical = img.crypt_method == H.CRYPT_LUKS
        if img.crypt_method == H.CRYPT_AES:
            self._open_aes(options)
            writable = False
        elif img.crypt_method == H.CRYPT_LUKS:
            self._open_luks(options)
        elif img.crypt_method != H.CRYPT_NONE:
            raise UnsupportedFeatureError(f"qcow2 crypt_method {img.crypt_method}")
        elif img.crypto_header is not None:
            raise CorruptImageError("qcow2 encryption header extension present without encryption")

        # "Header": backing file
        img.backing_file = None
        if hdr.backing_file_offset:
            if img.data_file_raw:
                raise CorruptImageError("qcow2 image has a backing file and raw external data")
            n = hdr.backing_file_size
            if n > H.MAX_BACKING_FILE_NAME or n == 0:
                raise CorruptImageError(f"qcow2 backing file name length {n} is invalid")
            if hdr.backing_file_offset + n > min(fsize, cs):
                raise CorruptImageError("qcow2 backing file name lies outside the first cluster")
            raw = dev.pread(n, hdr.backing_file_offset)
            try:
                img.backing_file = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptImageError("qcow2 backing file name is not UTF-8") from None
        self.backing_chain_info: list[dict[str, Any]] = []
        self._open_backing_image(options)

        self.size = img.size
        self.readonly = not writable
        img.writable = writable
        self.block_size = (512 if img.crypt_method else 1, max(4096, 1 << img.unit_bits) if cb <= 16 else 1 << cb, 32 << 20)
        self.can_zero = writable
        self.can_trim = writable
        self.can_multi_conn = not writable
        if writable:
            self._prepare_write()

    def _parse_extensions(self, first: bytes) -> None:
        """"Header extensions": walk them from header_length to the end marker."""
        img = self._img
        img.feature_names = {}
        img.backing_format = None
        img.data_file_name = None
        img.crypto_header = None
        img.bitmaps = None
        img.extensions = []
        pos = img.header_length
        hdr = img.header
        limit = len(first)
        if hdr.backing_file_offset and hdr.backing_file_offset < limit:
            limit = max(pos, hdr.backing_file_offset)
        seen = set()
        while pos + H.EXTENSION_HEADER_SIZE <= limit:
            ext = H.ExtensionHeader.parse(first[pos : pos + 8])
            if ext.type == H.EXT_END:
                return
            data_end = pos + 8 + ext.length
            if data_end > limit:
                raise CorruptImageError(f"qcow2 header extension {ext.type:#010x} runs past the first cluster")
            data = first[pos + 8 : data_end]
            if ext.type in seen and ext.type in H.EXT_NAMES:
                raise CorruptImageError(f"qcow2 header extension {H.EXT_NAMES[ext.type]} appears twice")
            seen.add(ext.type)
            img.extensions.append(ext.type)
            if ext.type == H.EXT_BACKING_FORMAT:
                img.backing_format = data.decode("utf-8", "replace")
            elif ext.type == H.EXT_DATA_FILE:
                img.data_file_name = data.decode("utf-8", "replace")
            elif ext.type == H.EXT_FEATURE_NAMES:
                for i in range(0, len(data) - H.FEATURE_NAME_ENTRY_SIZE + 1, H.FEATURE_NAME_ENTRY_SIZE):
                    fe = H.FeatureNameEntry.parse(data[i : i + H.FEATURE_NAME_ENTRY_SIZE])
                    img.feature_names[(fe.type, fe.bit)] = fe.name.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif ext.type == H.EXT_CRYPTO_HEADER:
                if len(data) < 16:
                    raise CorruptImageError("qcow2 encryption header extension is too short")
                img.crypto_header = H.CryptoHeaderExtension.parse(data)
            elif ext.type == H.EXT_BITMAPS:
                if len(data) >= 24:
                    img.bitmaps = H.BitmapsExtension.parse(data)
            pos = data_end + (-ext.length % 8)

    def _read_snapshot_table(self) -> list[dict[str, Any]]:
        """"Snapshots": the snapshot table (bounded: count, extra data, file size)."""
        img = self._img
        hdr = img.header
        n = hdr.nb_snapshots
        if n == 0:
            return []
        if n > H.MAX_SNAPSHOTS:
            raise CorruptImageError(f"qcow2 image claims {n} snapshots")
        if hdr.snapshots_offset % img.cluster_size or hdr.snapshots_offset == 0:
            raise CorruptImageError("qcow2 snapshot table is not cluster-aligned")
        fsize = self.backing.size
        pos = hdr.snapshots_offset
        out = []
        for i in range(n):
            if pos + H.SNAPSHOT_ENTRY_FIXED_SIZE > fsize:
                raise CorruptImageError(f"qcow2 snapshot table entry {i} lies outside the file")
            fixed = self.backing.pread(H.SNAPSHOT_ENTRY_FIXED_SIZE, pos)
            extra_size = int.from_bytes(fixed[36:40], "big")
            id_size = int.from_bytes(fixed[12:14], "big")
            name_size = int.from_bytes(fixed[14:16], "big")
            if extra_size > H.MAX_SNAPSHOT_EXTRA:
                raise CorruptImageError(f"qcow2 snapshot {i} has {extra_size} bytes of extra data")
            total = H.snapshot_entry_size(extra_size, id_size, name_size)
            if pos + H.SNAPSHOT_ENTRY_FIXED_SIZE + extra_size + id_size + name_size > fsize:
                raise CorruptImageError(f"qcow2 snapshot table entry {i} lies outside the file")
            raw = self.backing.pread(H.SNAPSHOT_ENTRY_FIXED_SIZE + extra_size + id_size + name_size, pos)
            ent = H.SnapshotEntry.parse(raw)
            extra = ent.extra_data
            disk_size = None
            vm_state = ent.vm_state_size
            if len(extra) >= 8:
                vm_state = int.from_bytes(extra[0:8], "big")
            if len(extra) >= 16:
                disk_size = int.from_bytes(extra[8:16], "big")
            out.append({
                "id": ent.id_str.decode("utf-8", "replace"),
                "name": ent.name.decode("utf-8", "replace"),
                "l1_table_offset": ent.l1_table_offset,
                "l1_size": ent.l1_size,
                "date_sec": ent.date_sec,
                "date_nsec": ent.date_nsec,
                "vm_clock_nsec": ent.vm_clock_nsec,
                "vm_state_size": vm_state,
                "disk_size": disk_size,
            })
            pos += total
        return out

    def _find_snapshot(self, key: str) -> dict[str, Any]:
        snaps = self._img.snapshots
        for snap in snaps:
            if snap["id"] == key:
                return snap
        for snap in snaps:
            if snap["name"] == key:
                return snap
        known = ", ".join(f"{s['id']} ({s['name']})" for s in snaps) or "none"
        raise InvalidArgumentError(f"qcow2 image has no snapshot with id or name {key!r} (snapshots: {known})")

    def _set_l1(self, offset: int, entries: int) -> None:
        """"Cluster mapping": the L1 table must cover the virtual size and lie in the file."""
        img = self._img
        cs = img.cluster_size
        need = -(-img.size // img.l2_span) if img.size else 0
        if entries < need:
            raise CorruptImageError(f"qcow2 L1 table has {entries} entries, {need} needed for the virtual size")
        if entries * 8 > H.MAX_L1_BYTES:
            raise CorruptImageError(f"qcow2 L1 table of {entries} entries exceeds 32 MiB")
        if entries and (offset % cs or offset == 0):
            raise CorruptImageError(f"qcow2 L1 table offset {offset:#x} is not cluster-aligned")
        if offset + entries * 8 > self.backing.size:
            raise CorruptImageError("qcow2 L1 table lies outside the file")
        img.l1_offset = offset
        img.l1_size = entries

    def _resolve(self, name: str, options: dict[str, Any]) -> str:
        if name.startswith("json:"):
            raise UnsupportedFeatureError("qcow2 file names in json: syntax are not supported")
        if "://" in name or os.path.isabs(name):
            return name
        base = options.get("base_dir")
        if base is None:
            leaf = _leaf_path(self.backing)
            base = os.path.dirname(leaf) if leaf else os.getcwd()
        return os.path.join(base, name)

    def _open_backing_image(self, options: dict[str, Any]) -> None:
        """"Header": backing_file_offset; the chain is opened with imageformats.detect.open."""
        img = self._img
        given = options.get("backing_image", None)
        if given is False or img.backing_file is None:
            return
        if isinstance(given, BlockDevice):
            self.backing_image = given
            return
        from .. import detect

        chain = tuple(options.get("_qcow2_chain", ()))
        me = _leaf_path(self.backing)
        if me and not chain:
            chain = (me,)
        if len(chain) >= MAX_BACKING_DEPTH:
            raise CorruptImageError(f"qcow2 backing chain is deeper than {MAX_BACKING_DEPTH} images")
        path = self._resolve(img.backing_file, options)
        if "://" not in path:
            real = os.path.realpath(path)
            if real in chain:
                raise CorruptImageError(f"qcow2 backing chain loops back to {img.backing_file!r}")
            if not os.path.exists(path):
                raise InvalidArgumentError(f"qcow2 backing file {img.backing_file!r} not found (looked at {path})")
            sub = {k: v for k, v in options.items() if k not in ("snapshot", "backing_image", "data_file", "base_dir")}
            sub["_qcow2_chain"] = chain + (real,)
        else:
            sub = {k: v for k, v in options.items() if k not in ("snapshot", "backing_image", "data_file", "base_dir")}
            sub["_qcow2_chain"] = chain + (path,)
        fmt = img.backing_format
        if fmt is not None and fmt not in ("raw", "file"):
            if fmt not in detect.formats():
                raise UnsupportedFeatureError(f"qcow2 backing file format {fmt!r} is not supported")
        self.backing_image = detect.open(path, format=("raw" if fmt == "file" else fmt), writable=False, **sub)

    def _open_luks(self, options: dict[str, Any]) -> None:
        """"Full disk encryption header pointer" + "Data encryption" (LUKS, physical sector IVs)."""
        img = self._img
        if img.crypto_header is None:
            raise CorruptImageError("qcow2 LUKS image lacks the encryption header extension")
        ch = img.crypto_header
        if ch.offset % img.cluster_size or ch.offset == 0 or ch.length == 0 or ch.offset + ch.length > self.backing.size:
            raise CorruptImageError("qcow2 encryption header lies outside the file")
        try:
            from ..luks1 import unlock
        except ImportError:
            raise UnsupportedFeatureError("qcow2 LUKS encryption needs imageformats.luks1") from None
        secret = {k: options.get(k) for k in ("passphrase", "key_file", "volume_key", "key_slot")}
        if not any(secret[k] is not None for k in ("passphrase", "key_file", "volume_key")):
            from ..errors import SecretRequiredError

            raise SecretRequiredError("the qcow2 image is LUKS-encrypted: give a passphrase, key file or volume key")
        hdr_dev = SliceDevice(self.backing.clone() if hasattr(self.backing, "clone") else self.backing, ch.offset, ch.length)
        try:
            luks, key = unlock(hdr_dev, **secret)
        finally:
            hdr_dev.close()
        img.luks = luks
        img.cipher_desc = f"{luks.cipher_name}-{luks.cipher_mode}"
        self._cipher = _sector_cipher(luks.cipher_name, luks.cipher_mode, key)
        img.cipher_args = (luks.cipher_name, luks.cipher_mode, key)

    def _open_aes(self, options: dict[str, Any]) -> None:
        """"Data encryption", AES: AES-128-CBC, plain64 IVs from the guest sector; the key is the
        passphrase's first 16 bytes, zero-padded (qemu's legacy qcow scheme).  Read-only."""
        img = self._img
        pw = options.get("passphrase")
        if pw is None:
            from ..errors import SecretRequiredError

            raise SecretRequiredError("the qcow2 image uses legacy AES encryption: give its passphrase")
        key = bytes(pw)[:16].ljust(16, b"\0")
        img.cipher_desc = "aes-128-cbc-plain64 (legacy qcow AES)"
        img.cipher_args = ("aes", "cbc-plain64", key)
        self._cipher = _sector_cipher(*img.cipher_args)

    # ------------------------------------------------------------------ tables

    def _l1_entry_block(self, block: int) -> np.ndarray:
        img = self._img
        arr = img.l1_cache.get(block)
        if arr is None:
            first = block * L1_BLOCK_ENTRIES
            n = min(L1_BLOCK_ENTRIES, img.l1_size - first)
            raw = self.backing.pread(n * 8, img.l1_offset + first * 8)
            arr = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            img.l1_cache.put(block, arr, arr.nbytes)
        return arr

    def _l1_entry(self, index: int) -> int:
        return int(self._l1_entry_block(index // L1_BLOCK_ENTRIES)[index % L1_BLOCK_ENTRIES])

    def _l2_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for ``l1_index``, 0 when unallocated ("L1 table entry")."""
        img = self._img
        if l1_index >= img.l1_size:
            return 0
        off = self._l1_entry(l1_index) & H.L1E_OFFSET_MASK
        if off and (off % img.cluster_size or off + img.cluster_size > self.backing.size):
            raise CorruptImageError(f"qcow2 L1 entry {l1_index} points to {off:#x}, outside the file or unaligned")
        return off

    def _l2_table(self, l2_off: int) -> np.ndarray:
        img = self._img
        table = img.l2_cache.get(l2_off)
        if table is None:
            raw = self.backing.pread(img.cluster_size, l2_off)
            table = T.parse_l2(raw, img.extended_l2)
            img.l2_cache.put(l2_off, table, table.nbytes)
        return table

    def _classify(self, table: np.ndarray, first: int, count: int):
        img = self._img
        return T.classify(
            table, first, count,
            cluster_bits=img.cluster_bits, extended=img.extended_l2,
            zero_flag=img.version >= 3, data_file=img.has_data_file,
        )

    def _segments(self, offset: int, end: int, *, split_compressed: bool) -> Iterator[tuple[int, int, int, int, Any]]:
        """(start, stop, kind, host, aux) runs of the guest range, per L2 table.

        DATA: host is the host offset of ``start``.  COMPRESSED: aux is the L2 entry.
        """
        img = self._img
        ub = img.unit_bits
        unit = 1 << ub
        cb = img.cluster_bits
        pos = offset
        while pos < end:
            l1i = pos // img.l2_span
            tend = min(end, (l1i + 1) * img.l2_span)
            l2_off = self._l2_offset(l1i)
            if not l2_off:
                yield pos, tend, T.UNALLOCATED, 0, None
                pos = tend
                continue
            table = self._l2_table(l2_off)
            base = l1i * img.l2_span
            c0 = (pos - base) >> cb
            c1 = ((tend - base - 1) >> cb) + 1
            kind, host, cluster = self._classify(table, c0, c1 - c0)
            ubase = base + (c0 << cb)
            u_first = (pos - ubase) >> ub
            u_last = ((tend - ubase - 1) >> ub) + 1
            kind, host, cluster = kind[u_first:u_last], host[u_first:u_last], cluster[u_first:u_last]
            ubase += u_first << ub
            for a, b, k in T.runs(kind, host, cluster, unit, split_compressed=split_compressed):
                start = max(pos, ubase + (a << ub))
                stop = min(tend, ubase + (b << ub))
                if k == T.DATA:
                    yield start, stop, k, int(host[a]) + (start - ubase - (a << ub)), None
                elif k == T.COMPRESSED:
                    ci = int(cluster[a])
                    ent = table[ci, 0] if img.extended_l2 else table[ci]
                    yield start, stop, k, 0, int(ent)
                else:
                    yield start, stop, k, 0, None
            pos = tend

    # ------------------------------------------------------------------ reading

    def _readinto(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        compressed: list[tuple[int, int, int]] = []  # (guest start, guest stop, entry)
        for start, stop, kind, host, aux in self._segments(offset, end, split_compressed=True):
            view = buf[start - offset : stop - offset]
            if kind == T.DATA:
                self._read_data(view, host, start)
            elif kind == T.ZERO:
                view[:] = bytes(len(view))
            elif kind == T.UNALLOCATED:
                self._read_backing(view, start)
            else:
                compressed.append((start, stop, aux))
        if compressed:
            self._read_compressed(buf, offset, compressed)

    def _read_data(self, view: memoryview, host: int, guest: int) -> None:
        """A run contiguous on the host: one read of the data device (decrypted with LUKS)."""
        dev = self.data_dev
        n = len(view)
        if host >= dev.size:
            raise CorruptImageError(f"qcow2 data cluster at {host:#x} lies outside the {dev.size}-byte data file")
        if self._cipher is None:
            avail = min(n, dev.size - host)
            dev.readinto(view[:avail], host)
            if avail < n:
                view[avail:] = bytes(n - avail)  # past the end of the file: zeroes, as qemu reads them
            return
        a = host & ~511
        b = (host + n + 511) & ~511
        tmp = bytearray(b - a)
        avail = min(len(tmp), dev.size - a)
        dev.readinto(memoryview(tmp)[:avail], a)
        # "Data encryption": LUKS IVs use the physical (host) sector, legacy AES the guest sector
        self._cipher.decrypt_into(memoryview(tmp), (a if self._img.iv_physical else guest - (host - a)) // 512)
        view[:] = memoryview(tmp)[host - a : host - a + n]

    def _read_backing(self, view: memoryview, start: int) -> None:
        """"Cluster mapping": unallocated -> the backing image, zeroes past its end or without one."""
        bimg = self.backing_image
        n = len(view)
        if bimg is None or start >= bimg.size:
            view[:] = bytes(n)
            return
        avail = min(n, bimg.size - start)
        bimg.readinto(view[:avail], start)
        if avail < n:
            view[avail:] = bytes(n - avail)

    def _read_compressed(self, buf: memoryview, offset: int, items: list[tuple[int, int, int]]) -> None:
        """"Compressed Clusters Descriptor": batch neighbouring compressed data into one read,
        decompress on several threads when there are many clusters."""
        img = self._img
        cb = img.cluster_bits
        cs = img.cluster_size
        fsize = self.backing.size
        todo: list[tuple[int, int, int, int, int]] = []  # (guest start, guest stop, cluster guest base, host, nbytes)
        for start, stop, entry in items:
            base = (start >> cb) << cb
            cached = img.z_cache.get(base)
            if cached is not None and cached[0] == entry:
                buf[start - offset : stop - offset] = memoryview(cached[1])[start - base : stop - base]
                continue
            host, nbytes = T.compressed_extent(entry, cb)
            if host >= fsize:
                raise CorruptImageError(f"qcow2 compressed cluster at {host:#x} lies outside the file")
            nbytes = min(nbytes, fsize - host)
            todo.append((start, stop, base, host, nbytes, entry))
        if not todo:
            return
        # group into host-contiguous reads
        groups: list[list] = []
        for item in sorted(todo, key=lambda t: t[3]):
            if groups and item[3] <= groups[-1][1] + COMPRESSED_READ_GAP and item[3] + item[4] - groups[-1][0] <= 64 << 20:
                groups[-1][1] = max(groups[-1][1], item[3] + item[4])
                groups[-1][2].append(item)
            else:
                groups.append([item[3], item[3] + item[4], [item]])
        jobs = []
        for gstart, gend, members in groups:
            raw = bytearray(gend - gstart)
            self.backing.readinto(raw, gstart)
            mv = memoryview(raw)
            for start, stop, base, host, nbytes, entry in members:
                jobs.append((mv[host - gstart : host - gstart + nbytes], start, stop, base, entry))
        ctype = img.compression_type

        def work(job):
            data, start, stop, base, entry = job
            out = _decompress(data, cs, ctype)
            buf[start - offset : stop - offset] = memoryview(out)[start - base : stop - base]
            if stop - start < cs:
                img.z_cache.put(base, (entry, out), cs)

        if len(jobs) >= PARALLEL_DECOMPRESS_MIN:
            for fut in [_decompress_pool().submit(work, j) for j in jobs]:
                fut.result()
        else:
            for j in jobs:
                work(j)

    # ------------------------------------------------------------------ extents

    def _extents(self, length: int, offset: int) -> Iterator[Extent]:
        end = offset + length
        for start, stop, kind, _host, _aux in self._segments(offset, end, split_compressed=False):
            if kind in (T.DATA, T.COMPRESSED):
                yield Extent(start, stop - start, zero=False, hole=False)
            elif kind == T.ZERO:
                # as qemu-nbd reports it: nothing stored, reads as zeroes -> hole+zero
                yield Extent(start, stop - start, zero=True, hole=True)
            else:
                yield from self._backing_extents(start, stop)

    def _backing_extents(self, start: int, stop: int) -> Iterator[Extent]:
        """"unallocated -> backing": the backing image's allocation, holes past its end."""
        bimg = self.backing_image
        if bimg is not None and start < bimg.size:
            bend = min(stop, bimg.size)
            for ext in bimg.extents(bend - start, start):
                s, e = max(ext.start, start), min(ext.end, bend)
                if e > s:
                    yield Extent(s, e - s, ext.zero, ext.hole)
            start = bend
        if start < stop:
            yield Extent(start, stop - start, zero=True, hole=True)

    # ------------------------------------------------------------------ writing

    def _prepare_write(self) -> None:
        raise ReadOnlyError("qcow2 writing is not available yet")

    # ------------------------------------------------------------------ misc

    def flush(self) -> None:
        self._check_open()
        if not self.readonly:
            self.data_dev.flush()
            if self.data_dev is not self.backing:
                self.backing.flush()

    def clone(self) -> "Qcow2Device":
        self._check_open()
        dev = object.__new__(Qcow2Device)
        dev.__dict__.update(self.__dict__)
        dev._closed = False
        dev.backing = self.backing.clone()
        dev.data_dev = dev.backing if self.data_dev is self.backing else self.data_dev.clone()
        dev.backing_image = self.backing_image.clone() if self.backing_image is not None else None
        if self._cipher is not None:
            dev._cipher = _sector_cipher(*self._img.cipher_args)
        return dev

    def _close_children(self, close_backing: bool) -> None:
        if self.backing_image is not None:
            self.backing_image.close()
            self.backing_image = None
        if self.data_dev is not None and self.data_dev is not self.backing:
            self.data_dev.close()
        self.data_dev = None
        if close_backing and self.backing is not None:
            self.backing.close()

    def close(self) -> None:
        if not self._closed:
            try:
                if not self.readonly:
                    self.flush()
            finally:
                self._closed = True
                self._close_children(close_backing=True)

    def layer_info(self) -> dict[str, Any]:
        """What ``qemu-img info`` shows for this image."""
        img = self._img
        info: dict[str, Any] = {
            "virtual-size": self.size,
            "cluster-size": img.cluster_size,
            "compat": "0.10" if img.version == 2 else "1.1",
        }
        if img.version >= 3:
            info["compression-type"] = H.COMPRESSION_NAMES[img.compression_type]
            info["lazy-refcounts"] = img.lazy_refcounts
            info["refcount-bits"] = 1 << img.refcount_order
            info["extended-l2"] = img.extended_l2
            info["corrupt"] = img.corrupt
        if img.dirty:
            info["dirty-flag"] = True
        if img.backing_file is not None:
            info["backing-filename"] = img.backing_file
            if img.backing_format:
                info["backing-filename-format"] = img.backing_format
            chain = []
            dev = self.backing_image
            while dev is not None:
                entry = {"format": "raw" if dev.format_name == "file" else dev.format_name, "virtual-size": dev.size}
                path = _leaf_path(dev)
                if path:
                    entry["filename"] = path
                chain.append(entry)
                dev = getattr(dev, "backing_image", None)
            info["backing-chain"] = chain
        if img.has_data_file:
            info["data-file"] = img.data_file_name
            info["data-file-raw"] = img.data_file_raw
        if img.crypt_method:
            enc = {"format": "luks" if img.crypt_method == H.CRYPT_LUKS else "aes"}
            if getattr(img, "cipher_desc", None):
                enc["cipher"] = img.cipher_desc
            info["encrypt"] = enc
        if img.snapshots:
            info["snapshots"] = [
                {"id": s["id"], "name": s["name"], "vm-state-size": s["vm_state_size"], "date-sec": s["date_sec"],
                 "date-nsec": s["date_nsec"], "vm-clock-nsec": s["vm_clock_nsec"]}
                for s in img.snapshots
            ]
        if img.snapshot is not None:
            info["opened-snapshot"] = {"id": img.snapshot["id"], "name": img.snapshot["name"]}
        if img.bitmaps is not None:
            info["bitmaps"] = img.bitmaps.nb_bitmaps
        return info


def _sector_cipher(name: str, mode: str, key: bytes):
    from ..luks1.sectors import SectorCipher

    return SectorCipher(name, mode, key)


def _decompress(data: memoryview, cluster_size: int, ctype: int) -> bytes:
    """One compressed cluster -> exactly ``cluster_size`` bytes (bounded output; bombs are errors)."""
    try:
        if ctype == H.COMPRESSION_DEFLATE:
            # "compression_type" 0: raw deflate, no zlib header (qemu writes windowBits -12)
            d = zlib.decompressobj(-15)
            out = d.decompress(data, cluster_size)
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(bytes(data), read_across_frames=False)
            parts = []
            got = 0
            while got < cluster_size:
                chunk = reader.read(cluster_size - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            out = b"".join(parts)
    except (zlib.error, zstandard.ZstdError) as exc:
        raise CorruptImageError(f"qcow2 compressed cluster does not decompress: {exc}") from None
    if len(out) != cluster_size:
        raise CorruptImageError(f"qcow2 compressed cluster decompresses to {len(out)} bytes, not {cluster_size}")
    return out


def open_qcow2(dev: BlockDevice, writable: bool, options: dict[str, Any]) -> Qcow2Device:
    """detect.Format opener."""
    return Qcow2Device(dev, writable=writable, options=options)


def probe_qcow2(head: bytes, dev: BlockDevice) -> bool:
    return head[:4] == H.MAGIC and len(head) >= 8 and int.from_bytes(head[4:8], "big") >= 2
