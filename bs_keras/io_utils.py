"""`atomic_path`: write a file or directory under a temporary name, then rename."""

import contextlib
import os
import shutil
import uuid


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it to `path` on success.

    The temporary name sits in the same directory (so the rename is atomic)
    and keeps the extension (`last.tmp-….keras`, `epoch.tmp-….weights.h5`),
    which `model.save` and `savefig` need. Write a file or create a directory
    there. On success it replaces `path`; an existing directory is swapped out
    and removed (restored if the swap fails). A file is flushed to disk
    (`fsync`) before the rename, so a late write error (a full disk on a
    filesystem that allocates lazily) still leaves `path` as it was, and a
    power cut cannot leave an empty file under the final name. On an
    exception the temporary path is removed and `path` is left as it was.

    Example:

    ```python
    with atomic_path("run/report.json") as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    ```
    """
    path = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(path))
    stem, dot, suffix = name.partition(".")
    if not stem:  # a hidden name such as ".env"
        stem, dot, suffix = name, "", ""
    tmp = os.path.join(parent, f"{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{dot}{suffix}")
    try:
        yield tmp
        if os.path.isfile(tmp):
            _fsync(tmp)
        if os.path.isdir(tmp) and os.path.isdir(path) and not os.path.islink(path):
            old = os.path.join(parent, f"{stem}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(parent)
    finally:
        _remove(tmp)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path):
    """Makes a rename in `path` durable; best effort (not every OS or
    filesystem can fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
