"""``imageformats info IMG [--output json]``: format stack, virtual size, per-layer details."""

from __future__ import annotations

import json
import sys

from .common import add_secret_arguments, human_size, open_image


def register(sub) -> None:
    p = sub.add_parser("info", help="show the format stack, virtual size and per-layer details")
    p.add_argument("image")
    p.add_argument("-f", "--format", help="force the format stack (e.g. xz,qcow2)")
    p.add_argument("--output", choices=["human", "json"], default="human")
    add_secret_arguments(p)
    p.set_defaults(func=run)


def describe(dev, filename: str) -> dict:
    """The JSON document ``info --output json`` prints; layers listed top (guest) first."""
    layers = []
    for layer in dev.layers():
        entry = {"format": layer.format_name, "virtual-size": layer.size}
        entry.update(layer.layer_info())
        layers.append(entry)
    return {
        "filename": filename,
        "format": dev.format_name if dev.backing is not None else "raw",
        "virtual-size": dev.size,
        "stack": [layer["format"] for layer in reversed(layers)],
        "layers": layers,
    }


def run(args) -> int:
    with open_image(args, args.image, fmt=args.format) as dev:
        doc = describe(dev, args.image)
    if args.output == "json":
        json.dump(doc, sys.stdout, indent=4)
        sys.stdout.write("\n")
        return 0
    print(f"image: {doc['filename']}")
    print(f"file format: {doc['format']}")
    print(f"virtual size: {human_size(doc['virtual-size'])} ({doc['virtual-size']} bytes)")
    print(f"format stack: {' > '.join(doc['stack'])}")
    for layer in doc["layers"]:
        details = {k: v for k, v in layer.items() if k not in ("format",)}
        print(f"{layer['format']}:")
        for key, value in details.items():
            print(f"    {key}: {value}")
    return 0
