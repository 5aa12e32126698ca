"""Editable gzip: partial-deflate, in-place patches with CRC recombination, random access (GzipDevice).

See docs/gzip.md.  Modules: crc (CRC-32/CRC-64 combine algebra), writer
(partial-deflate), layout (stored-block map and deflate walker), patch
(gzip-patch with a crash-safe journal), device (GzipDevice), xz_stored (the
editable-xz variant), inflate (system zlib with block stops), header (layout).
"""
