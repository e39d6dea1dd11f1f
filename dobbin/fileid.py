"""Which file a path names, asked without reading the file's timestamps.

Why not `os.stat`: since Linux 6.13 (multigrain timestamps) a stat that
reports a file's times marks them as seen, so the next write must stamp
a fine-grained time and dirty the inode.  A writer that checks its path
before each commit then paid that in every fdatasync: W1 ran 12-25%
slower.  `statx` asked for the inode number only leaves the times
alone.  Python has no `os.statx` before 3.15, so libc's is called
through ctypes; where libc or the kernel lacks it, `os.stat` is used.
"""

import ctypes
import errno
import os

_AT_FDCWD = -100
_STATX_INO = 0x100


class _Statx(ctypes.Structure):
    """`struct statx` of <linux/stat.h>, as far as the device numbers;
    `_spare` pads it to the kernel's full 256 bytes."""

    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("_spare0", ctypes.c_uint16),
                ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("times", ctypes.c_uint8 * 64),
                ("rdev_major", ctypes.c_uint32), ("rdev_minor", ctypes.c_uint32),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32),
                ("_spare", ctypes.c_uint8 * 112)]


def _libc_statx():
    """libc's statx function, or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                         ctypes.POINTER(_Statx)]
    function.restype = ctypes.c_int
    return function


_statx = _libc_statx()


def path_identity(path):
    """(device, inode) of the file `path` names now, as `os.stat` gives
    them, or None when nothing has that name.  Any other failure raises
    the OSError `os.stat` would."""
    global _statx
    if _statx is not None:
        result = _Statx()
        if _statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_INO, ctypes.byref(result)) == 0:
            return os.makedev(result.dev_major, result.dev_minor), result.ino
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            return None
        if code not in (errno.ENOSYS, errno.EPERM):  # EPERM: a sandbox refusing the call
            raise OSError(code, os.strerror(code), path)
        _statx = None
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino
