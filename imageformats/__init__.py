"""imageformats: pure-Python disk-image format codecs as stackable block devices.

    import imageformats
    with imageformats.open("disk.qcow2.xz") as dev:      # xz -> qcow2, probed
        data = dev.pread(4096, 0)
        for ext in dev.extents(dev.size, 0):
            print(ext.start, ext.length, ext.zero, ext.hole)
"""

from .block import BlockDevice, Extent, FileDevice, MemoryDevice, SliceDevice, copy
from .detect import open, formats, outputs
from .errors import (
    ClosedDeviceError,
    CorruptImageError,
    DeviceIOError,
    ImageFormatError,
    InvalidArgumentError,
    NoSpaceError,
    NotFastError,
    NotFoundError,
    OutOfRangeError,
    ReadOnlyError,
    SecretRequiredError,
    UnsupportedFeatureError,
    WrongPassphraseError,
)

__version__ = "0.1.0"

__all__ = [
    "open",
    "formats",
    "outputs",
    "copy",
    "BlockDevice",
    "Extent",
    "FileDevice",
    "MemoryDevice",
    "SliceDevice",
    "ImageFormatError",
    "InvalidArgumentError",
    "CorruptImageError",
    "UnsupportedFeatureError",
    "NotFastError",
    "WrongPassphraseError",
    "SecretRequiredError",
    "ReadOnlyError",
    "OutOfRangeError",
    "DeviceIOError",
    "NoSpaceError",
    "NotFoundError",
    "ClosedDeviceError",
]
