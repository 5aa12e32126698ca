"""The library's exceptions: one root, one class per kind of failure.

Every class carries an ``errno`` (what an NBD server or nbdkit reports to its
client) and an ``exit_code`` (what the CLI exits with), so the layers that map
errors never need a table of their own.  Messages name what is wrong and never
contain secrets.
"""

from __future__ import annotations

import errno as _errno


class ImageFormatError(Exception):
    """Root of every error the library raises on purpose."""

    errno = _errno.EIO
    exit_code = 1


class InvalidArgumentError(ImageFormatError, ValueError):
    """The caller asked for something that makes no sense (bad option, bad range spec)."""

    errno = _errno.EINVAL
    exit_code = 2


class NotFoundError(InvalidArgumentError):
    """A file or directory that was named does not exist."""

    errno = _errno.ENOENT
    exit_code = 11


class CorruptImageError(ImageFormatError):
    """The image is damaged or hostile: bad magic, bad checksum, a table pointing outside the file."""

    errno = _errno.EIO
    exit_code = 3


class UnsupportedFeatureError(ImageFormatError):
    """A valid image uses something this library does not implement; the message names it."""

    errno = _errno.ENOTSUP
    exit_code = 4


class NotFastError(UnsupportedFeatureError):
    """A zero request with ``fast=True`` could not be done faster than writing zeroes (NBD_CMD_FLAG_FAST_ZERO)."""


class WrongPassphraseError(ImageFormatError):
    """No key slot opens with the given passphrase, key file or volume key."""

    errno = _errno.EACCES
    exit_code = 5


class SecretRequiredError(ImageFormatError):
    """The image is encrypted and no passphrase, key file or volume key was given."""

    errno = _errno.EACCES
    exit_code = 5


class ReadOnlyError(ImageFormatError):
    """A write, zero or trim on a device (or a range of it) that cannot be written."""

    errno = _errno.EPERM
    exit_code = 6


class OutOfRangeError(ImageFormatError):
    """A request before offset 0 or past the end of the device."""

    errno = _errno.EINVAL
    exit_code = 7


class DeviceIOError(ImageFormatError):
    """The backing store failed (EIO from a disk, a server, or the evil fault injector)."""

    errno = _errno.EIO
    exit_code = 8


class NoSpaceError(ImageFormatError):
    """The backing store is full."""

    errno = _errno.ENOSPC
    exit_code = 9


class ClosedDeviceError(ImageFormatError):
    """An operation on a device after close()."""

    errno = _errno.EBADF
    exit_code = 1


__all__ = [
    "ImageFormatError",
    "InvalidArgumentError",
    "NotFoundError",
    "CorruptImageError",
    "UnsupportedFeatureError",
    "NotFastError",
    "WrongPassphraseError",
    "SecretRequiredError",
    "ReadOnlyError",
    "OutOfRangeError",
    "DeviceIOError",
    "NoSpaceError",
    "ClosedDeviceError",
]
