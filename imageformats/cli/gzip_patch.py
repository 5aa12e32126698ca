"""``gzip-patch FILE OFFSET [DATA|-]``: overwrite bytes inside the stored ranges of a gzip (or editable xz)."""

from __future__ import annotations

import argparse
import sys

from ..errors import InvalidArgumentError
from . import run_command
from .common import parse_size

#: Largest patch read from stdin or a file in one go.
MAX_PATCH = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gzip-patch",
        description="Overwrite bytes at an uncompressed OFFSET of a gzip (or partial-deflate --format xz) file "
                    "in place.  The bytes must lie inside stored (editable) ranges; the CRC is updated "
                    "without reading the rest of the file.")
    p.add_argument("file", help="the .gz (or .xz) file")
    p.add_argument("offset", nargs="?", help="uncompressed offset to write at")
    p.add_argument("data", nargs="?", default="-", help="file holding the new bytes ('-' = stdin, the default)")
    p.add_argument("--list", action="store_true", help="print the editable ranges (START END LENGTH) and exit")
    p.add_argument("--repair", action="store_true",
                   help="finish (or discard) an interrupted patch from FILE.gzpatch-journal and exit")
    p.add_argument("--walk", action="store_true",
                   help="ignore the partial-deflate map in the header and walk the deflate stream")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def run(args) -> int:
    from ..gzip_partial.patch import list_ranges, patch_file, repair

    if args.repair:
        result = repair(args.file)
        print({"clean": f"{args.file}: no interrupted patch",
               "discarded": f"{args.file}: discarded an incomplete journal (the file was not modified)",
               "replayed": f"{args.file}: completed the interrupted patch"}[result])
        return 0
    if args.list:
        source, size, ranges = list_ranges(args.file, walk=args.walk)
        for s, e in ranges:
            print(f"{s} {e} {e - s}")
        return 0
    if args.offset is None:
        raise InvalidArgumentError("give OFFSET (and DATA or stdin), or --list / --repair")
    offset = parse_size(args.offset)
    if args.data == "-":
        data = sys.stdin.buffer.read(MAX_PATCH + 1)
    else:
        with open(args.data, "rb") as f:
            data = f.read(MAX_PATCH + 1)
    if len(data) > MAX_PATCH:
        raise InvalidArgumentError("patch larger than 1 GiB: split it into several gzip-patch runs")
    result = patch_file(args.file, [(offset, data)], walk=args.walk)
    if result["repaired"] == "replayed":
        print("gzip-patch: completed an interrupted earlier patch first", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(run, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
