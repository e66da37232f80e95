"""Write aside, then rename: replacing files and folders that a running service reads.

The gateway reads `data/prepared/databases/` while `prepare` rebuilds it, and `prepare` reads the
feedback folder while the monitoring flow rewrites it. A reader must see the old contents or the
new ones, never a half-written file or a missing folder.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(new: Path, target: Path) -> None:
    """Put the folder `new` (same file system) in place of `target`: one atomic exchange where
    the OS has it, else two renames (a moment without `target`); the old contents are removed."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if _exchange(new, target):
        new.rename(old)
    else:
        target.rename(old)
        new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def aside(target: Path) -> Path:
    """A fresh sibling path of `target` to build its replacement in (hidden, per process)."""
    tmp = target.with_name(f".{target.name}.new-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def copy_file(src: Path, target: Path) -> None:
    """Copy `src` over `target` so that a reader opens either the old file or the whole new one."""
    tmp = aside(target)
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
