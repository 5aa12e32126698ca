"""GzipDevice random access and writes, and the seed scenario (GPT disk, ext2 /boot, patch a file)."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

import imageformats
from imageformats.block import FileDevice
from imageformats.errors import ReadOnlyError
from imageformats.gzip_partial.device import GzipDevice
from imageformats.gzip_partial.patch import list_ranges
from peers import run
from test_gzip_partial import make, sample


def _random_reads(dev, ref: bytes, count: int, seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(count):
        off = rnd.randrange(0, len(ref))
        n = min(rnd.choice([1, 4096, 70_000, 300_000]), len(ref) - off)
        assert dev.pread(n, off) == ref[off:off + n], (off, n)


@pytest.mark.parametrize("maker", ["gzip -6", "gzip -1", "pigz -p 2", "multi", "partial"])
def test_random_reads_match_zcat(tmp_path, maker):
    data = sample(3 << 20, 41)
    (tmp_path / "img").write_bytes(data)
    path = tmp_path / "img.gz"
    if maker == "multi":
        path.write_bytes(run("gzip", "-c", input=data[:1_000_000]).stdout + run("gzip", "-c", input=b"").stdout
                         + run("pigz", "-c", input=data[1_000_000:]).stdout)
    elif maker == "partial":
        path = make(tmp_path, data, [(0, 500_000), (2_000_000, 2_100_000)])
    else:
        tool_, *args = maker.split()
        path.write_bytes(run(tool_, *args, "-c", tmp_path / "img").stdout)
    ref = run("zcat", path).stdout
    assert ref == data
    with GzipDevice(FileDevice(str(path)), span=64 * 1024) as dev:
        assert dev.size == len(data)
        _random_reads(dev, ref, 150, 1)
        assert dev.pread(len(ref), 0) == ref
        info = dev.layer_info()
        assert info["layout"] == ("map" if maker == "partial" else "walk")
        if maker != "partial":
            assert info["access-points"] >= len(data) // (64 * 1024) // 2
    # probed by open()
    with imageformats.open(str(path)) as dev:
        assert dev.format_name == "gzip" and dev.pread(4096, 123_456) == ref[123_456:127_552]


def test_index_export_import(tmp_path):
    data = sample(2 << 20, 42)
    path = tmp_path / "a.gz"
    path.write_bytes(run("gzip", "-c", input=data).stdout)
    idx = tmp_path / "a.gzidx"
    with GzipDevice(FileDevice(str(path)), span=128 * 1024, index_file=str(idx)) as dev:
        npoints = dev.layer_info()["access-points"]
    assert idx.exists()
    with GzipDevice(FileDevice(str(path)), index_file=str(idx)) as dev:
        assert dev.layer_info()["access-points"] == npoints and dev.layer_info()["span"] == 128 * 1024
        _random_reads(dev, data, 50, 2)
    other = tmp_path / "b.gz"
    other.write_bytes(run("gzip", "-c", input=data[:-5]).stdout)
    with pytest.raises(imageformats.CorruptImageError):
        GzipDevice(FileDevice(str(other)), index_file=str(idx))


def test_corrupt_gzip_raises_our_error(tmp_path):
    data = sample(500_000, 43)
    raw = bytearray(run("gzip", "-c", input=data).stdout)
    for mutate in (lambda b: b[: len(b) // 2], lambda b: b[:-4] + b"\0\0\0\1",
                   lambda b: b[:200] + bytes(400) + b[600:]):
        path = tmp_path / "bad.gz"
        path.write_bytes(bytes(mutate(bytearray(raw))))
        with pytest.raises(imageformats.CorruptImageError):
            GzipDevice(FileDevice(str(path)))


def test_writable_device_in_stored_ranges(tmp_path):
    data = sample(2 << 20, 44)
    path = make(tmp_path, data, [(100_000, 900_000)])
    model = bytearray(data)
    with imageformats.open(str(path), writable=True) as dev:
        assert dev.editable_ranges() == [(100_000, 900_000)]
        dev.pwrite(b"A" * 5000, 200_000)
        dev.pwrite(b"B" * 100, 202_000)
        model[200_000:205_000] = b"A" * 5000
        model[202_000:202_100] = b"B" * 100
        assert dev.pread(10_000, 199_000) == model[199_000:209_000]  # reads see pending writes
        with pytest.raises(ReadOnlyError, match=r"\[100000, 900000\)"):
            dev.pwrite(b"x", 950_000)
        dev.flush()
        run("gzip", "-t", path)
        assert run("zcat", path).stdout == bytes(model)
        dev.zero(1000, 899_000)
        model[899_000:900_000] = bytes(1000)
    run("gzip", "-t", path)
    assert run("zcat", path).stdout == bytes(model)
    with pytest.raises(ReadOnlyError):
        GzipDevice(FileDevice(str(path))).pwrite(b"x", 200_000)


def test_writable_foreign_gzip_stored_blocks(tmp_path):
    """gzip -1 stores incompressible data: those blocks are writable through the device."""
    rnd = random.Random(5)
    data = rnd.randbytes(400_000)
    path = tmp_path / "r.gz"
    path.write_bytes(run("gzip", "-1", "-c", input=data).stdout)
    with GzipDevice(FileDevice(str(path), writable=True), writable=True) as dev:
        ranges = dev.editable_ranges()
        assert ranges and ranges[0][0] == 0
        dev.pwrite(b"hello", 1000)
    run("gzip", "-t", path)
    assert run("zcat", path).stdout == data[:1000] + b"hello" + data[1005:]


# -- the seed scenario ------------------------------------------------------------------


def _debugfs(image, request: str, offset: int = 0) -> str:
    spec = f"{image}?offset={offset}" if offset else str(image)
    return run("debugfs", "-R", request, spec).stdout.decode()


def test_seed_scenario_gpt_ext2_boot(tmp_path):
    """Build a GPT disk with sfdisk and an ext2 /boot (mke2fs -d), keep /boot editable, patch grub.cfg."""
    boot = tmp_path / "bootdir"
    (boot / "grub").mkdir(parents=True)
    cfg = b"set default=0\nmenuentry 'Fedora 36' {\n  linux /vmlinuz root=/dev/sda2 quiet\n}\n" * 20
    (boot / "grub" / "grub.cfg").write_bytes(cfg)
    (boot / "vmlinuz").write_bytes(os.urandom(300_000))
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "12M", disk], check=True)
    run("sfdisk", "-q", disk, input=b"label: gpt\nstart=2048, size=8192, name=boot\nstart=10240, name=root\n")
    fs = tmp_path / "boot.ext2"
    run("mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-d", boot, fs, "4M")
    part_start = 2048 * 512
    with open(disk, "r+b") as f:  # the boot file system into partition 1, compressible filler into 2
        f.seek(part_start)
        f.write(fs.read_bytes())
        f.seek(10240 * 512)
        f.write(sample(1 << 20, 50))
    gz = tmp_path / "disk.img.gz"
    r = subprocess.run(["partial-deflate", "--partition", "1", "-p", disk, gz], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run("gzip", "-t", gz)
    assert list_ranges(str(gz))[2] == [(part_start, part_start + 8192 * 512)]
    assert os.path.getsize(gz) < os.path.getsize(disk)
    # Where grub.cfg lives: debugfs on the partition inside the disk image.
    blocks = _debugfs(disk, "blocks /grub/grub.cfg", part_start).split()
    first = int(blocks[0])
    assert [int(b) for b in blocks] == list(range(first, first + len(blocks)))  # contiguous
    new_cfg = cfg.replace(b"quiet", b"debug")
    assert len(new_cfg) == len(cfg)
    r = subprocess.run(["gzip-patch", gz, str(part_start + first * 1024)], input=new_cfg, capture_output=True)
    assert r.returncode == 0, r.stderr
    run("gzip", "-t", gz)
    out = tmp_path / "out.img"
    out.write_bytes(run("zcat", gz).stdout)
    assert _debugfs(out, "cat /grub/grub.cfg", part_start).encode() == new_cfg
    run("e2fsck", "-n", "-f", f"{out}?offset={part_start}", check=False)
    # Only grub.cfg changed.
    before, after = disk.read_bytes(), out.read_bytes()
    diff = [i for i in range(0, len(before), 4096) if before[i:i + 4096] != after[i:i + 4096]]
    assert len(diff) <= 2
    # And through the block device: the partition reads back with the new file.
    with imageformats.open(str(gz)) as dev:
        off = part_start + first * 1024
        assert dev.pread(len(new_cfg), off) == new_cfg


def test_nbd_client_edits_boot_of_gzipped_disk(tmp_path):
    """`imageformats serve -w disk.gz` + qemu-io as the NBD client writing into the stored range."""
    data = sample(2 << 20, 60)
    path = make(tmp_path, data, [(1 << 20, (1 << 20) + 256 * 1024)])
    cmd = ('qemu-io -f raw -c "write -P 0x41 1052672 8192" -c "read -P 0x41 1052672 8192" "$uri" && '
           '! qemu-io -f raw -c "write -P 0x42 4096 4096" "$uri"')
    r = subprocess.run(["imageformats", "serve", "-w", str(path), "--run", cmd], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    run("gzip", "-t", path)
    model = data[:1052672] + b"A" * 8192 + data[1052672 + 8192:]
    assert run("zcat", path).stdout == model


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["write", "read", "flush"]), st.floats(0, 1), st.integers(0, 80_000)),
                max_size=25))
def test_writable_device_against_a_model(tmp_path_factory, ops):
    tmp = tmp_path_factory.mktemp("model")
    data = sample(600_000, 80)
    stored = [(0, 150_000), (300_000, 450_000), (599_000, 600_000)]
    path = make(tmp, data, stored)
    model = bytearray(data)
    rnd = random.Random(len(ops))
    with GzipDevice(FileDevice(str(path), writable=True), writable=True, max_pending=100_000) as dev:
        for op, frac, n in ops:
            if op == "write":
                s, e = stored[int(frac * 2.999)]
                a = rnd.randrange(s, e)
                n = min(n, e - a)
                buf = rnd.randbytes(n)
                dev.pwrite(buf, a)
                model[a:a + n] = buf
            elif op == "read":
                a = int(frac * (len(data) - 1))
                n = min(n, len(data) - a)
                assert dev.pread(n, a) == model[a:a + n]
            else:
                dev.flush()
                assert run("zcat", path).stdout == bytes(model)
    run("gzip", "-t", path)
    assert run("zcat", path).stdout == bytes(model)


def test_too_many_runs_for_the_map_falls_back_to_walk(tmp_path):
    data = sample(2500 * 400, 81)
    stored = [(i * 400, i * 400 + 200) for i in range(2500)]
    path = make(tmp_path, data, stored, level=1)
    assert run("zcat", path).stdout == data
    with GzipDevice(FileDevice(str(path), writable=True), writable=True) as dev:
        assert dev.layer_info()["layout"] == "walk"
        dev.pwrite(b"Z" * 200, 2400 * 400)
    run("gzip", "-t", path)
    assert run("zcat", path).stdout == data[:960_000] + b"Z" * 200 + data[960_200:]


def test_access_points_are_bounded(tmp_path, monkeypatch):
    import imageformats.gzip_partial.layout as L

    monkeypatch.setattr(L, "MAX_POINTS", 8)
    data = sample(4 << 20, 82)
    path = tmp_path / "b.gz"
    path.write_bytes(run("gzip", "-c", input=data).stdout)
    with GzipDevice(FileDevice(str(path)), span=32 * 1024) as dev:
        assert dev.layer_info()["access-points"] <= 9  # 4 MiB / 32 KiB would be 128
        _random_reads(dev, data, 40, 3)
    part = make(tmp_path, data, [(0, 100_000)])
    with GzipDevice(FileDevice(str(part)), span=32 * 1024) as dev:  # lazy index, thinned as it grows
        _random_reads(dev, data, 40, 4)
        assert dev.layer_info()["access-points"] < 60
