"""qcow2 (qemu copy-on-write v2/v3): reader and in-place writable device.

``Qcow2Device`` lives in device.py, the on-disk layout in header.py, table
decoding and caches in tables.py; writer.py (convert -O qcow2, create) is
separate.  Importing the package registers the format "qcow2" (kind image).
"""

from ..detect import Format, register_format
from .device import Qcow2Device, open_qcow2, probe_qcow2

register_format(Format("qcow2", "image", probe_qcow2, open_qcow2))

__all__ = ["Qcow2Device"]
