"""One way to write a file so that a reader never sees half of it: write_atomically.

The bytes go to a temporary file beside the target, are flushed to disk, and the temporary file
is then renamed over the target. A rename within one folder is atomic, so a crash at any moment
leaves either the old file or the new one, never a mixture. A crash mid-write may leave the
temporary file (name.XXXX.tmp) behind; the target itself is always whole, and
remove_leftovers deletes such files when the run that owns the folder starts again.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path


def write_atomically(path, data: bytes | str) -> None:
    """Replace the file at path with data (str is written as UTF-8), all at once or not at all."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_leftovers(path) -> None:
    """Delete the temporary files that writes to path cut short by a crash left behind.

    Only for the process that owns path's folder (a resumed run): another writer's file in
    progress would be deleted too.
    """
    path = Path(path)
    for leftover in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
        leftover.unlink(missing_ok=True)
