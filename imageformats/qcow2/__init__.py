"""qcow2: reader/writable device (device.py), on-disk layout (header.py), tables (tables.py)."""
