"""``imageformats create [-f raw|qcow2] [-o OPTS] [-b BACKING [-F FMT]] [-u] FILE [SIZE]``: a new empty image."""

from __future__ import annotations

import os

from ..block import FileDevice
from ..errors import InvalidArgumentError
from .common import parse_options, parse_size

FORMATS = ("raw", "qcow2")


def register(sub) -> None:
    p = sub.add_parser("create", help="create a new empty image (raw or qcow2), like qemu-img create")
    p.add_argument("filename")
    p.add_argument("size", nargs="?", help="virtual size (4096, 512M, 10G); qcow2 takes the backing file's if omitted")
    p.add_argument("-f", "--format", default="raw", help=f"image format: {', '.join(FORMATS)} (default raw)")
    p.add_argument("-o", "--options", action="append", metavar="KEY=VALUE,...",
                   help="format options, e.g. cluster_size=64K,compat=1.1,backing_file=base.qcow2 (see docs/)")
    p.add_argument("-b", "--backing", metavar="BACKING_FILE", help="qcow2: backing file (same as -o backing_file=)")
    p.add_argument("-F", "--backing-format", metavar="FMT", help="qcow2: backing file format (-o backing_fmt=)")
    p.add_argument("-u", "--unsafe", action="store_true",
                   help="qcow2: do not open the backing file to check it (a SIZE is then required)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    options = parse_options(args.options)
    if args.backing:
        options["backing_file"] = args.backing
    if args.backing_format:
        options["backing_fmt"] = args.backing_format
    size = options.pop("size", None) if args.size is None else args.size
    size_bytes = parse_size(size) if size is not None else None
    if args.format == "raw":
        if options:
            raise InvalidArgumentError(f"raw images take no options (got {', '.join(sorted(options))})")
        if size_bytes is None:
            raise InvalidArgumentError("create -f raw needs a SIZE")
        FileDevice.create(args.filename, size_bytes).close()
        final = size_bytes
    elif args.format == "qcow2":
        from ..qcow2.writer import create_qcow2

        final = create_qcow2(args.filename, size_bytes, options, check_backing=not args.unsafe)
    else:
        raise InvalidArgumentError(f"create supports {', '.join(FORMATS)} (got {args.format!r}); "
                                   "for other formats use convert")
    if not args.quiet:
        opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
        print(f"Formatting '{os.fspath(args.filename)}', fmt={args.format} size={final}" + (f" {opts}" if opts else ""))
    return 0
