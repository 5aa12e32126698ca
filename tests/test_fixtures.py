"""The stored fixtures: what README says they hold (checked with the real tools), our readers agree
with the real tools' decoding, and make-fixtures.sh regenerates the same content."""

from __future__ import annotations

import subprocess

import pytest

from contract import check_device
from peers import qemu_extents_as_ours, qemu_img_map, run

import imageformats

from conftest import ROOT

FIXTURES = ROOT / "fixtures"
KiB, MiB = 1024, 1 << 20

# fixture -> (format stack we must detect, command printing the guest view as raw on stdout)
FILES = {
    "disk.raw.xz": (["xz"], ["xz", "-dc"]),
    "disk-1block.raw.xz": (["xz"], ["xz", "-dc"]),
    "disk.raw.zst": (["zstd"], ["zstd", "-dcq"]),
    "disk.raw.gz": (["gzip"], ["gzip", "-dc"]),
    "tiny.qcow2": (["qcow2"], None),
    "tiny-compressed.qcow2": (["qcow2"], None),
    "overlay.qcow2": (["qcow2"], None),
}


def oracle(path, tmp_path) -> bytes:
    """The guest view decoded by the real tool."""
    _, cmd = FILES[path.name]
    if cmd is None:
        out = tmp_path / (path.name + ".oracle.raw")
        run("qemu-img", "convert", "-O", "raw", path, out)
        return out.read_bytes()
    return run(*cmd, path).stdout


def disk_raw() -> bytes:
    """disk.raw as fixtures/README.md describes it, built from the description (seq is the peer)."""
    text = subprocess.run(["seq", "1", "20000"], capture_output=True, check=True).stdout[:65536]
    buf = bytearray(MiB)
    buf[: len(text)] = text
    buf[512 * KiB : 576 * KiB] = b"\xab" * (64 * KiB)
    buf[1020 * KiB :] = b"\xcd" * (4 * KiB)
    return bytes(buf)


def tiny_qcow2() -> bytes:
    buf = bytearray(2 * MiB)
    buf[64 * KiB : 72 * KiB] = b"\xab" * (8 * KiB)
    buf[MiB : MiB + 512] = b"\xcd" * 512
    buf[1536 * KiB : 1544 * KiB] = b"\xef" * (8 * KiB)
    return bytes(buf)


def described(name: str) -> bytes:
    if name == "tiny.qcow2":
        return tiny_qcow2()
    if name == "overlay.qcow2":
        buf = bytearray(tiny_qcow2())
        buf[:4096] = b"\x77" * 4096
        buf[68 * KiB : 72 * KiB] = b"\x78" * 4096
        return bytes(buf)
    return disk_raw()


@pytest.mark.parametrize("name", sorted(FILES))
def test_fixture_is_what_the_readme_says(name, tmp_path):
    path = FIXTURES / name
    assert path.stat().st_size < 100 * KiB
    assert f"`{name}`" in (FIXTURES / "README.md").read_text()
    assert oracle(path, tmp_path) == described(name)


@pytest.mark.parametrize("name", sorted(FILES))
def test_our_reader_agrees_with_the_real_tool(name, tmp_path):
    path = FIXTURES / name
    want = oracle(path, tmp_path)
    dev = imageformats.open(path)
    assert [layer.format_name for layer in dev.layers()][:-1] == FILES[name][0]
    assert dev.size == len(want)
    assert dev.pread(dev.size, 0) == want
    exts = check_device(dev, want)  # the whole contract, with the tool's bytes as the oracle
    if name.endswith(".qcow2"):
        assert [(e.start, e.length, e.zero, e.hole) for e in exts] == qemu_extents_as_ours(qemu_img_map(path))


def test_make_fixtures_regenerates_the_same_content(tmp_path):
    out = tmp_path / "regen"
    run("bash", FIXTURES / "make-fixtures.sh", out)
    for name in FILES:
        assert oracle(out / name, tmp_path) == oracle(FIXTURES / name, tmp_path), name
