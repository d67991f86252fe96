"""The failures a user can cause, as exceptions the command line turns into short messages.

Every failure that the user's input or environment causes is raised as a UserError: the message
says what is wrong and where, `fix` what to do. The CLI (cli.py) prints them without a traceback
and exits with the error's code; anything else reaching it is a bug in mr1fast and is shown with
its traceback. Exit codes:

    0   success
    1   the run failed for a reason the user can fix (model, data, rewards, device, disk,
        permissions, an output folder in use)
    2   a usage error: the command line, a config file, an override or a config value
    70  a bug in mr1fast (EX_SOFTWARE): the traceback is printed
    130 interrupted (Ctrl-C); the newest checkpoint is kept and the same command resumes
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional

EXIT_FAILURE, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 70, 130


class UserError(Exception):
    """A failure the user can fix. str(error) says what is wrong and where; `fix` what to do."""
    exit_code = EXIT_FAILURE

    def __init__(self, message: str, fix: Optional[str] = None):
        super().__init__(message)
        self.fix = fix


class UsageError(UserError, ValueError):
    """A wrong command line, config file, override or config value (exit code 2). A ValueError
    too, so code that validates values keeps its usual contract."""
    exit_code = EXIT_USAGE


# errno -> (what it means, what to do)
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another path"),
    errno.EROFS: ("read-only file system", "choose a writable path"),
    errno.ENOTDIR: ("a file stands where a folder is needed", "remove it or choose another path"),
    errno.EISDIR: ("a folder stands where a file is needed", "remove it or choose another path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("a file already stands where a folder is needed",
                   "remove it or choose another path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
}


def from_os_error(e: OSError, doing: str) -> Optional[UserError]:
    """A UserError for an OSError the environment causes (full disk, permissions, read-only
    file system, ...), naming what was being done and the file; None for any other OSError."""
    if e.errno not in _OS_ERRORS:
        return None
    meaning, fix = _OS_ERRORS[e.errno]
    where = f" ({e.filename})" if e.filename else ""
    return UserError(f"{doing}: {meaning}{where}", fix=fix)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def debug_enabled() -> bool:
    """MR1FAST_DEBUG=1: show full tracebacks for user errors too (as --debug does)."""
    return os.environ.get("MR1FAST_DEBUG", "") not in ("", "0")
