"""Shared fixtures.  Reference tools are real peers: the suite installs them, never skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

REQUIRED_TOOLS = ["qemu-img", "qemu-io", "cryptsetup", "nbdkit", "nbdinfo", "nbdcopy", "xz", "zstd", "gzip", "pigz"]


def pytest_sessionstart(session):
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if missing and os.environ.get("PYTEST_XDIST_WORKER") is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "install-peers.sh")], check=True)


@pytest.fixture
def sparse_raw(tmp_path):
    """A 16 MiB sparse raw file made with truncate + dd: data at 1 MiB (64 KiB) and 8 MiB (1 MiB)."""
    path = tmp_path / "sparse.raw"
    subprocess.run(["truncate", "-s", "16M", str(path)], check=True)
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=64K", "count=1", "seek=16",
                    "conv=notrunc", "status=none"], check=True)
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=1", "seek=8",
                    "conv=notrunc", "status=none"], check=True)
    return path
