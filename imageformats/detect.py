"""Format registry, magic probing and stacking for :func:`imageformats.open`.

Each format package calls :func:`register_format` when imported.  The packages
are listed once in ``FORMAT_MODULES`` with a cheap magic-byte check, so
``open()`` imports only the packages an image is made of.  Layers are stacked
by kind:

* ``container`` (xz, zstd, gzip): a compressed copy of some other image; after
  one, probing starts again from the top (qcow2 inside xz).
* ``image`` (qcow2): a disk image; after one, only ``crypto`` layers are probed
  (a LUKS volume inside the guest disk, opened only when a secret is given).
* ``crypto`` (luks): the last layer.

Raw is the fallback: when nothing matches, the device is the guest disk.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .block import BlockDevice, FileDevice
from .errors import InvalidArgumentError, SecretRequiredError

def _zstd_magic(head: bytes) -> bool:
    # a zstd frame, or a skippable frame (0x184D2A5?) that a seekable file may start with
    return head[:4] == b"\x28\xb5\x2f\xfd" or (len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50)


# Where each format, output and URL source lives.  A package registers itself when
# imported; open() imports a format's package only when the cheap magic check here
# (a superset of the format's own probe) matches, and convert imports only the output
# it writes, so start-up never pays for numpy, construct or OpenSSL it does not use.
#: format name -> (kind, magic check on the first bytes, module that registers it)
FORMAT_MODULES: dict[str, tuple[str, Callable[[bytes], bool], str]] = {
    "xz": ("container", lambda head: head[:6] == b"\xfd7zXZ\x00", "imageformats.xz"),
    "zstd": ("container", _zstd_magic, "imageformats.zstd"),
    "gzip": ("container", lambda head: head[:2] == b"\x1f\x8b", "imageformats.gzip_partial.device"),
    "qcow2": ("image", lambda head: head[:4] == b"QFI\xfb", "imageformats.qcow2"),
    "luks": ("crypto", lambda head: head[:6] == b"LUKS\xba\xbe", "imageformats.luks1"),
}
#: output name (convert -O) -> module that registers it
OUTPUT_MODULES: dict[str, str] = {
    "raw": "imageformats.raw",
    "gzip": "imageformats.gzip_partial.device",
    "qcow2": "imageformats.qcow2.writer",
    "xz": "imageformats.xz",
    "zstd": "imageformats.zstd",
    "luks": "imageformats.luks1",
}
#: URL scheme -> module that registers its source
SOURCE_MODULES: dict[str, str] = {
    "http": "imageformats.http",
    "https": "imageformats.http",
    "sparse-random": "imageformats.testing.sparse_random",
}

#: How many layers open() stacks at most (a guard against self-similar images).
MAX_STACK_DEPTH = 8
#: Bytes read from the start of a device for probing.
PROBE_BYTES = 4096

KINDS = ("container", "image", "crypto")


@dataclass(frozen=True)
class Format:
    """A registered format.

    probe(head: bytes, device) -> bool    True when ``head`` (the first PROBE_BYTES,
                                         or fewer for a small device) is this format.
    open(device, writable: bool, options: dict) -> BlockDevice
                                         the layer; options holds secrets and settings,
                                         an opener takes what it knows and ignores the rest.
    """

    name: str
    kind: str
    probe: Callable[[bytes, BlockDevice], bool] | None
    open: Callable[[BlockDevice, bool, dict[str, Any]], BlockDevice]
    needs_secret: bool = False


@dataclass(frozen=True)
class Output:
    """A format that ``convert -O NAME`` can write.

    write(src: BlockDevice, dst_path: str, options: dict, progress) -> None
    """

    name: str
    write: Callable[..., None]
    description: str = ""


_formats: dict[str, Format] = {}
_outputs: dict[str, Output] = {}
_sources: dict[str, Callable[[str, dict[str, Any]], BlockDevice]] = {}
_loaded = False


def register_format(fmt: Format) -> None:
    if fmt.kind not in KINDS and fmt.name != "raw":
        raise ValueError(f"unknown format kind {fmt.kind!r}")
    _formats[fmt.name] = fmt


def register_output(out: Output) -> None:
    _outputs[out.name] = out


def register_source(scheme: str, opener: Callable[[str, dict[str, Any]], BlockDevice]) -> None:
    """Register a URL scheme (``http``) whose opener returns the leaf device for a URL."""
    _sources[scheme] = opener


def _load() -> None:
    """Import every known package (for listings; open() and convert load lazily)."""
    global _loaded
    if not _loaded:
        for module in ["imageformats.raw", *(m for _, _, m in FORMAT_MODULES.values()),
                       *OUTPUT_MODULES.values(), *SOURCE_MODULES.values()]:
            importlib.import_module(module)
        _loaded = True


def formats() -> dict[str, Format]:
    _load()
    return dict(_formats)


def outputs() -> dict[str, Output]:
    _load()
    return dict(_outputs)


def get_output(name: str) -> Output:
    if name in OUTPUT_MODULES:
        importlib.import_module(OUTPUT_MODULES[name])
    if name not in _outputs:
        _load()
    try:
        return _outputs[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown output format {name!r} (known: {', '.join(sorted(_outputs))})"
        ) from None


def get_format(name: str) -> Format:
    """The registered format ``name`` (importing its package), or InvalidArgumentError."""
    if name in FORMAT_MODULES:
        importlib.import_module(FORMAT_MODULES[name][2])
    if name not in _formats:
        _load()
    try:
        return _formats[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown format {name!r} (known: {', '.join(sorted(_formats))})") from None


def _read_head(dev: BlockDevice) -> bytes:
    return dev.head(PROBE_BYTES)


def probe(dev: BlockDevice, kinds: tuple[str, ...] = KINDS) -> Format | None:
    """The first format of one of ``kinds`` whose probe accepts ``dev``."""
    head = _read_head(dev)
    for kind in kinds:
        for name, (fmt_kind, magic, module) in FORMAT_MODULES.items():
            if fmt_kind == kind and magic(head):
                importlib.import_module(module)
                fmt = _formats.get(name)
                if fmt is not None and fmt.probe is not None and fmt.probe(head, dev):
                    return fmt
        for name, fmt in list(_formats.items()):  # formats registered by other packages
            if name not in FORMAT_MODULES and fmt.kind == kind and fmt.probe is not None and fmt.probe(head, dev):
                return fmt
    return None


def open_leaf(path: str | os.PathLike, *, writable: bool = False, options: dict[str, Any] | None = None) -> BlockDevice:
    """The bottom device for a path or URL: a FileDevice, or a registered source."""
    text = os.fspath(path)
    scheme, sep, _ = text.partition("://")
    if sep and scheme in SOURCE_MODULES:
        importlib.import_module(SOURCE_MODULES[scheme])
    if sep and scheme in _sources:
        return _sources[scheme](text, options or {})
    if sep and "/" not in scheme:
        raise InvalidArgumentError(f"unsupported URL scheme {scheme!r} in {text!r}")
    return FileDevice(text, writable=writable)


def _has_secret(options: dict[str, Any]) -> bool:
    return any(options.get(k) is not None for k in ("passphrase", "key_file", "volume_key", "key_data"))


def open(
    path_or_device: str | os.PathLike | BlockDevice,
    *,
    format: str | None = None,
    writable: bool = False,
    **options: Any,
) -> BlockDevice:
    """Open an image and stack the layers it is made of; return the top (guest) device.

    ``format``: None probes; a name (``"qcow2"``) or a comma-separated stack from
    the bottom up (``"xz,qcow2,luks"``) forces the layers; ``"raw"`` opens no layer.
    ``writable``: open every layer for writing (formats that cannot write raise
    ReadOnlyError on write requests, not here).  ``options``: secrets
    (``passphrase``, ``key_file``, ``volume_key``...) and per-format settings, passed
    to every opener.
    """
    if isinstance(path_or_device, BlockDevice):
        dev = path_or_device
    else:
        dev = open_leaf(path_or_device, writable=writable, options=options)
        text = os.fspath(path_or_device)
        if "://" not in text:
            # Relative backing-file names are resolved against the image's directory.
            options.setdefault("base_dir", os.path.dirname(os.path.abspath(text)))
    try:
        if format is not None:
            for name in [n.strip() for n in format.split(",") if n.strip()]:
                if name == "raw":
                    continue
                dev = get_format(name).open(dev, writable, options)
            return dev
        kinds: tuple[str, ...] = KINDS
        inside_image = False
        for _ in range(MAX_STACK_DEPTH):
            if dev.size == 0:
                return dev
            fmt = probe(dev, kinds)
            if fmt is None:
                return dev
            if fmt.needs_secret and inside_image and not _has_secret(options):
                # A LUKS volume inside a guest disk is opened only when a secret is given.
                return dev
            if fmt.needs_secret and not _has_secret(options):
                raise SecretRequiredError(f"the {fmt.name} image needs a passphrase, key file or volume key")
            dev = fmt.open(dev, writable, options)
            if fmt.kind == "crypto":
                return dev
            if fmt.kind == "image":
                inside_image = True
                kinds = ("crypto",)
        return dev
    except BaseException:
        dev.close()
        raise


__all__ = [
    "Format",
    "Output",
    "register_format",
    "register_output",
    "register_source",
    "formats",
    "outputs",
    "get_output",
    "probe",
    "get_format",
    "open",
    "open_leaf",
    "FORMAT_MODULES",
    "OUTPUT_MODULES",
    "SOURCE_MODULES",
]
