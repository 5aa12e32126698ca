"""convert never destroys its own input."""

import hashlib
import subprocess
import sys


def test_convert_refuses_to_overwrite_its_source(sparse_raw):
    before = hashlib.sha256(sparse_raw.read_bytes()).hexdigest()
    proc = subprocess.run([sys.executable, "-m", "imageformats", "convert", str(sparse_raw), str(sparse_raw)],
                          capture_output=True)
    assert proc.returncode == 2
    assert proc.stderr.count(b"\n") == 1 and b"is the source image itself" in proc.stderr
    assert hashlib.sha256(sparse_raw.read_bytes()).hexdigest() == before
    # a second name for the same file (hard link) is the same file too
    link = sparse_raw.with_name("link.raw")
    link.hardlink_to(sparse_raw)
    proc = subprocess.run([sys.executable, "-m", "imageformats", "convert", "-O", "qcow2", str(sparse_raw), str(link)],
                          capture_output=True)
    assert proc.returncode == 2
    assert hashlib.sha256(sparse_raw.read_bytes()).hexdigest() == before
