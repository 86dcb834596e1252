"""One way to write a file so that a reader never sees half of it: write_atomically.

The bytes go to a temporary file beside the target, are flushed to disk, and the temporary file
is then renamed over the target. A rename within one folder is atomic, so a crash at any moment
leaves either the old file or the new one, never a mixture. A crash mid-write may leave the
temporary file (name.XXXX.tmp) behind; the target itself is always whole, and
remove_leftovers deletes such files when the run that owns the folder starts again.

A stop signal (Ctrl-C, SIGTERM) that arrives during a write must not cut it short either: a
KeyboardInterrupt raised inside zipfile or numpy can be replaced by the error of their cleanup
("Can't close the ZIP file while there is an open writing handle"), and the run would report a
failed write instead of a stop. The stop handler asks stop_later(signum) while writing() is true;
the signal is sent again once the outermost `with whole_write():` ends.

with_path makes a failed write's error name its file. json_text is the JSON these files hold:
strict JSON, a NaN or infinite float written as null (Python's json would write NaN, which
other JSON readers refuse).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
from pathlib import Path

_writes_in_progress = 0
_held_signals: list[int] = []


@contextlib.contextmanager
def whole_write():
    """Stop signals that arrive inside are held (see stop_later) and sent again as it ends."""
    global _writes_in_progress
    _writes_in_progress += 1
    try:
        yield
    finally:  # also when the write failed: the stop is still owed, and it wins over the error
        _writes_in_progress -= 1
        if _writes_in_progress == 0 and _held_signals:
            signum = _held_signals[0]
            _held_signals.clear()
            os.kill(os.getpid(), signum)  # its handler runs now, raising the stop here


def writing() -> bool:
    return _writes_in_progress > 0


def stop_later(signum: int) -> None:
    """Hold a stop signal until the write in progress has ended."""
    _held_signals.append(signum)


def write_atomically(path, data: bytes | str) -> None:
    """Replace the file at path with data (str is written as UTF-8), all at once or not at all."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with whole_write():
        _write_then_rename(path, data)


def _write_then_rename(path: Path, data: bytes) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary files
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise with_path(error, path) if isinstance(error, OSError) else error


def with_path(error: OSError, path) -> OSError:
    """The same system error, naming `path`: a failed write (full disk, file-size limit) names no
    file, and one inside write_atomically would name the temporary file."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror, str(path))  # OSError picks the subclass from errno


def remove_leftovers(path) -> None:
    """Delete the temporary files that writes to path cut short by a crash left behind.

    Only for the process that owns path's folder (a resumed run): another writer's file in
    progress would be deleted too.
    """
    path = Path(path)
    for leftover in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
        leftover.unlink(missing_ok=True)


def json_text(obj, indent=None) -> str:
    """obj as strict JSON text: a float that is NaN or infinite becomes null."""
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj
