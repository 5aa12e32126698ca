"""``imageformats map IMG [--output json]``: extents as {start, length, zero, hole}.

The JSON form is a contract other tools parse: a list of objects with exactly
``start``, ``length`` (bytes), ``zero`` (reads as zeroes) and ``hole``
(unallocated in every layer), ascending and contiguous from 0 to the size.
"""

from __future__ import annotations

import json
import sys

from .common import add_secret_arguments, open_image


def register(sub) -> None:
    p = sub.add_parser("map", help="print the allocation map of the guest disk")
    p.add_argument("image")
    p.add_argument("-f", "--format", help="force the format stack (e.g. xz,qcow2)")
    p.add_argument("--output", choices=["human", "json"], default="human")
    add_secret_arguments(p)
    p.set_defaults(func=run)


def _kind(ext) -> str:
    return "hole" if ext.hole else ("zero" if ext.zero else "data")


def run(args) -> int:
    out = sys.stdout
    with open_image(args, args.image, fmt=args.format) as dev:
        extents = dev.extents(dev.size, 0) if dev.size else iter(())
        if args.output == "json":
            out.write("[")
            for i, ext in enumerate(extents):
                out.write(("," if i else "") + "\n" + json.dumps(ext.as_dict()))
            out.write("\n]\n")
            return 0
        out.write(f"{'Offset':<20}{'Length':<20}Type\n")
        for ext in extents:
            out.write(f"{ext.start:<#20x}{ext.length:<#20x}{_kind(ext)}\n")
    return 0
