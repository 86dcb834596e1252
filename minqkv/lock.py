"""One writer per folder: folder_lock takes an exclusive lock on a run or sweep folder.

Two processes writing one folder interleave metrics, delete each other's temporary files and
count results twice. Each writer therefore holds an fcntl lock on FOLDER/.lock while it writes;
a second writer is refused at once with the holder's process id. The kernel drops the lock when
the holder exits, however it exits (even SIGKILL), so a crashed run never leaves a stale lock:
the file stays, the lock does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
    """Another live process is writing this folder."""


@contextlib.contextmanager
def folder_lock(folder, what: str = "folder"):
    """Hold an exclusive lock on `folder` (created if missing) for the body of the with block.

    what: how the error names the folder, e.g. 'run folder' or 'sweep folder'.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise FolderBusy(f"{what} {folder} is in use by another minqkv process (pid {holder}); "
                             "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock
