"""qcow2 reading: a matrix of images made by qemu-img / qemu-io, compared byte-for-byte with
``qemu-img convert -O raw`` and extent-for-extent with qemu-nbd (NBD base:allocation) and qemu-img map."""

from __future__ import annotations

import json
import os
import threading

import pytest
from peers import run_qemu_luks
from qcow2_oracle import check_image, qemu_raw, sh
from test_http import nginx  # noqa: F401  (fixture: a real nginx on loopback)

import imageformats
from imageformats.errors import InvalidArgumentError
from imageformats.qcow2 import Qcow2Device

MiB = 1 << 20


def qemu_io(path, *cmds, fmt="qcow2", cwd=None):
    args = []
    for c in cmds:
        args += ["-c", c]
    sh("qemu-io", "-f", fmt, *args, path, cwd=cwd)


def pattern_writes(path, size, cs, cwd=None, zero=True):
    """Data, zero writes and discards at cluster-aligned and unaligned places."""
    cmds = [
        "write -P 0x11 0 64k",
        f"write -P 0x22 {cs // 2} {min(cs, 65536) * 3}",
        f"write -P 0x33 {size // 2 + 1000} 70000",
        f"write -P 0x44 {size - 512} 512",
    ]
    if zero:
        cmds += [f"write -z {size // 4} {min(cs * 4, size // 4)}", f"write -z {cs} {cs}"]
    cmds += [f"discard {size // 2 + 2 * cs if cs < 1 << 20 else 0} {cs}", f"write -P 0x55 {size // 2 + 2 * cs} 4k"]
    qemu_io(path, *cmds, cwd=cwd)


@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_cluster_sizes_and_compat(tmp_path, cs, compat):
    img = tmp_path / "a.qcow2"
    size = 6 * MiB if cs < MiB else 10 * MiB
    sh("qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size={cs},compat={compat}", img, size)
    pattern_writes(img, size, cs)
    check_image(img, tmp_path)
    with imageformats.open(str(img)) as dev:
        info = dev.layer_info()
    q = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)
    assert info["cluster-size"] == q["cluster-size"] == cs
    assert info["compat"] == q["format-specific"]["data"]["compat"] == compat
    assert info["virtual-size"] == q["virtual-size"]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [4096, 65536, 2 * MiB])
def test_compressed(tmp_path, ctype, cs):
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(5 * MiB)
        f.write(os.urandom(300_000))  # incompressible: qemu stores those clusters uncompressed
        f.seek(1 * MiB)
        f.write(b"compressible text " * 60_000)
        f.seek(4 * MiB + 123)
        f.write(b"\x01\x02" * 20_000)
    img = tmp_path / "c.qcow2"
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cs}", raw, img)
    ref = check_image(img, tmp_path)
    assert ref == raw.read_bytes()
    with imageformats.open(str(img)) as dev:
        assert dev.layer_info()["compression-type"] == ctype


@pytest.mark.parametrize("cs", [16384, 65536, 2 * MiB])
def test_extended_l2(tmp_path, cs):
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", base, 8 * MiB)
    qemu_io(base, "write -P 0x5a 0 8M")
    img = tmp_path / "e.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={cs}", "-b", base.name, "-F", "qcow2",
       img, cwd=tmp_path)
    sub = cs // 32
    qemu_io(img, f"write -P 0x61 {sub * 3} {sub * 2}", f"write -P 0x62 {cs + 100} 300",
            f"write -z {2 * cs + sub} {sub * 5}", f"write -P 0x63 {5 * MiB} {min(cs * 2, MiB)}",
            f"discard {5 * MiB} {sub * 4}", f"write -z {6 * MiB} {cs}", cwd=tmp_path)
    check_image(img, tmp_path)
    with imageformats.open(str(img)) as dev:
        assert dev.layer_info()["extended-l2"] is True


def test_extended_l2_compressed(tmp_path):
    raw = tmp_path / "src.raw"
    raw.write_bytes((b"abc" * 1_000_000)[: 3 * MiB] + bytes(MiB))
    img = tmp_path / "ec.qcow2"
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "extended_l2=on", raw, img)
    qemu_io(img, "write -P 0x7 65600 100", "write -z 200000 4096")
    check_image(img, tmp_path)


def test_data_file(tmp_path):
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "data_file=d.data", img.name, 4 * MiB, cwd=tmp_path)
    qemu_io(img.name, "write -P 0x51 1M 1M", "write -z 3M 64k", "write -P 0x52 100 1000", cwd=tmp_path)
    check_image(img, tmp_path, cwd=tmp_path)
    with imageformats.open(str(img)) as dev:
        info = dev.layer_info()
        assert info["data-file"] == "d.data" and info["data-file-raw"] is False


def test_data_file_raw(tmp_path):
    img = tmp_path / "dr.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "data_file=dr.data,data_file_raw=on", img.name, 4 * MiB,
       cwd=tmp_path)
    qemu_io(img.name, "write -P 0x53 512k 1M", "write -z 3M 64k", cwd=tmp_path)
    ref = check_image(img, tmp_path, cwd=tmp_path)
    assert (tmp_path / "dr.data").read_bytes()[: len(ref)].ljust(len(ref), b"\0") == ref
    with imageformats.open(str(img)) as dev:
        assert dev.layer_info()["data-file-raw"] is True


def test_backing_chain_three_deep(tmp_path):
    """raw base (6 MiB) <- qcow2 mid (8 MiB, 64K) <- qcow2 top (10 MiB, 4K clusters), relative names."""
    base = tmp_path / "base.raw"
    sh("qemu-img", "create", "-f", "raw", base, 6 * MiB)
    qemu_io(base, "write -P 0x11 0 2M", "write -P 0x12 5M 1M", fmt="raw")
    sub = tmp_path / "sub"
    sub.mkdir()
    mid = sub / "mid.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", mid.name, 8 * MiB, cwd=sub)
    qemu_io(mid.name, "write -P 0x21 1M 2M", "write -z 4M 64K", "discard 0 64k", "write -P 0x22 7M 100",
            cwd=sub)
    top = tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "sub/mid.qcow2", "-F", "qcow2",
       top.name, 10 * MiB, cwd=tmp_path)
    qemu_io(top.name, "write -P 0x31 1536K 8K", "write -z 5M 16K", "write -P 0x32 9M 4K", "discard 1M 4k",
            cwd=tmp_path)
    check_image(top, tmp_path)
    with imageformats.open(str(top)) as dev:
        info = dev.layer_info()
        assert info["backing-filename"] == "sub/mid.qcow2"
        assert [c["format"] for c in info["backing-chain"]] == ["qcow2", "raw"]
        assert info["backing-chain"][1]["filename"] == str(base)


def test_backing_chain_probed_and_compressed_base(tmp_path):
    """qcow2 compressed base without a backing-format extension (probed), shorter than the top."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"base-data " * 300_000)
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, base)
    top = tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.name, 5 * MiB, cwd=tmp_path)
    # drop the backing-format extension (retype it as an unknown, ignorable one): both sides must probe
    data = bytearray(top.read_bytes()[:65536])
    pos = data.index(bytes.fromhex("e2792aca"))
    data[pos : pos + 4] = bytes.fromhex("12345678")
    with open(top, "r+b") as f:
        f.write(data)
    qemu_io(top.name, "write -P 0x99 1M 4k", cwd=tmp_path)
    check_image(top, tmp_path)


def test_snapshots(tmp_path):
    img = tmp_path / "s.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", img, 4 * MiB)
    qemu_io(img, "write -P 0x61 0 1M", "write -P 0x62 3M 64k")
    sh("qemu-img", "snapshot", "-c", "first", img)
    qemu_io(img, "write -P 0x63 512k 1M", "write -z 3M 64k")
    sh("qemu-img", "snapshot", "-c", "second", img)
    qemu_io(img, "write -P 0x64 0 4k", "discard 1M 64k")
    check_image(img, tmp_path)
    for key, qarg in (("first", "snapshot.name=first"), ("1", "snapshot.id=1"), ("second", "snapshot.name=second")):
        ref = qemu_raw(img, tmp_path, "-l", qarg)
        with imageformats.open(str(img), snapshot=key) as dev:
            assert dev.readonly
            assert dev.pread(dev.size, 0) == ref
            zeros = [e for e in dev.extents(dev.size, 0) if e.zero]
            assert all(ref[e.start : e.end] == bytes(e.length) for e in zeros)
    with imageformats.open(str(img)) as dev:
        snaps = dev.layer_info()["snapshots"]
    q = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)["snapshots"]
    assert [(s["id"], s["name"]) for s in snaps] == [(s["id"], s["name"]) for s in q]
    with pytest.raises(InvalidArgumentError, match="no snapshot"):
        imageformats.open(str(img), snapshot="nope")


def test_clone_and_threads(tmp_path):
    img = tmp_path / "t.qcow2"
    raw = tmp_path / "src.raw"
    raw.write_bytes(os.urandom(MiB) + b"z" * (3 * MiB))
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw, img)
    ref = raw.read_bytes()
    errors = []
    with imageformats.open(str(img), l2_cache_size=16384) as dev:

        def worker(d, seed):
            import random

            rnd = random.Random(seed)
            try:
                for _ in range(100):
                    off = rnd.randrange(len(ref))
                    n = rnd.randrange(1, min(100_000, len(ref) - off) + 1)
                    if d.pread(n, off) != ref[off : off + n]:
                        errors.append((off, n))
            finally:
                d.close()

        threads = [threading.Thread(target=worker, args=(dev.clone(), i)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert dev.pread(len(ref), 0) == ref
        assert dev._img.l2_cache.nbytes <= 16384
    assert not errors


def test_big_virtual_map_is_fast(tmp_path):
    """1 TiB virtual, data scattered over many L2 tables: map in well under 2 s."""
    import time

    img = tmp_path / "big.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", img, "1T")
    qemu_io(img, *[f"write -P 1 {i * 37}G 64k" for i in range(27)], "write -z 100G 1M")
    t0 = time.monotonic()
    with imageformats.open(str(img)) as dev:
        ext = [(e.start, e.length, e.zero, e.hole) for e in dev.extents(dev.size, 0)]
    assert time.monotonic() - t0 < 2.0
    from qcow2_oracle import nbd_map

    assert ext == nbd_map(img)


def test_cli_info_and_map(tmp_path):
    img = tmp_path / "i.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=16384,extended_l2=on,compression_type=zstd", img,
       3 * MiB)
    qemu_io(img, "write -P 3 0 4k")
    sh("qemu-img", "snapshot", "-c", "snap1", img)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "imageformats", "info", "--output", "json", str(img)],
                         capture_output=True, check=True).stdout
    doc = json.loads(out)
    q = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)
    layer = doc["layers"][0]
    assert doc["format"] == "qcow2" and doc["virtual-size"] == q["virtual-size"]
    assert layer["cluster-size"] == q["cluster-size"]
    spec = q["format-specific"]["data"]
    assert layer["extended-l2"] == spec["extended-l2"] and layer["compression-type"] == spec["compression-type"]
    assert [s["name"] for s in layer["snapshots"]] == [s["name"] for s in q["snapshots"]]
    out = subprocess.run([sys.executable, "-m", "imageformats", "map", "--output", "json", str(img)],
                         capture_output=True, check=True).stdout
    assert json.loads(out)[0] == {"start": 0, "length": 4096, "zero": False, "hole": False}


def test_direct_device_and_probe(tmp_path):
    img = tmp_path / "p.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", img, MiB)
    qemu_io(img, "write -P 0xab 0 512")
    from imageformats.block import FileDevice

    with Qcow2Device(FileDevice(str(img))) as dev:
        assert dev.pread(512, 0) == b"\xab" * 512
        assert dev.readonly
    with imageformats.open(str(img), format="qcow2") as dev:
        assert dev.pread(4, 510) == b"\xab\xab\0\0"


def test_luks_encrypted(tmp_path):
    """encrypt.format=luks: LUKS header found via extension 0x0537be77, host-sector IVs."""
    pw = tmp_path / "pw"
    pw.write_bytes(b"read-me-pass")
    obj = ["--object", f"secret,id=s0,file={pw}"]
    img = tmp_path / "l.qcow2"
    run_qemu_luks("qemu-img", "create", "-f", "qcow2", *obj, "-o",
                  "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=200,cluster_size=4096", img, 2 * MiB)
    opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=s0"
    sh("qemu-io", *obj, "--image-opts", "-c", "write -P 0x21 10000 300000", "-c", "write -z 1M 64k",
       "-c", "write -P 0x22 1500000 5000", opts)
    ref = qemu_raw(opts, tmp_path, *obj, "--image-opts")
    with imageformats.open(str(img), passphrase=b"read-me-pass") as dev:
        assert dev.pread(dev.size, 0) == ref
        assert dev.pread(777, 12345) == ref[12345 : 12345 + 777]
        info = dev.layer_info()
        assert info["encrypt"]["format"] == "luks" and "aes" in info["encrypt"]["cipher"]
        with dev.clone() as c:
            assert c.pread(4096, 8192) == ref[8192 : 8192 + 4096]
    from imageformats.errors import SecretRequiredError, WrongPassphraseError

    with pytest.raises(SecretRequiredError):
        imageformats.open(str(img))
    with pytest.raises(WrongPassphraseError):
        imageformats.open(str(img), passphrase=b"wrong")


def test_contract(tmp_path):
    """The shared block-device contract checks, with qemu-img convert -O raw as the oracle."""
    from contract import check_device

    base = tmp_path / "b.qcow2"
    raw = tmp_path / "b.raw"
    raw.write_bytes(os.urandom(300_000) + b"abc" * 300_000)
    sh("qemu-img", "convert", "-c", "-O", "qcow2", raw, base)
    img = tmp_path / "c.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", "-b", base.name, "-F", "qcow2", img.name,
       2 * MiB, cwd=tmp_path)
    qemu_io(img.name, "write -P 3 100000 5000", "write -z 1M 64k", cwd=tmp_path)
    ref = qemu_raw(img, tmp_path)
    check_device(imageformats.open(str(img)), expected=ref)



def test_backing_chain_over_http(tmp_path, nginx):
    """A qcow2 read over HTTP (a real nginx): its relative backing file comes from the same URL directory."""
    www = nginx.www / "q"
    www.mkdir(exist_ok=True)
    base = www / "base.qcow2"
    raw = tmp_path / "b.raw"
    raw.write_bytes(os.urandom(200_000) + b"base" * 200_000)
    sh("qemu-img", "convert", "-c", "-O", "qcow2", raw, base)
    top = www / "top.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.name, 2 * MiB, cwd=www)
    qemu_io(top.name, "write -P 0x66 300000 10000", cwd=www)
    ref = qemu_raw(top, tmp_path)
    with imageformats.open(f"{nginx.url}/q/top.qcow2") as dev:
        assert dev.pread(dev.size, 0) == ref
        assert dev.backing_image.format_name == "qcow2"


def test_remote_image_cannot_name_local_files(tmp_path, nginx):
    www = nginx.www / "q2"
    www.mkdir(exist_ok=True)
    local = tmp_path / "secret.raw"
    local.write_bytes(b"local secret" * 1000)
    top = www / "evil.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-u", "-b", str(local), "-F", "raw", top, MiB)
    from imageformats.errors import UnsupportedFeatureError

    with pytest.raises(UnsupportedFeatureError, match="local file"):
        imageformats.open(f"{nginx.url}/q2/evil.qcow2")
