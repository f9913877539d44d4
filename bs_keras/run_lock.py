"""`RunLock`: at most one training process writes a run directory.

Built on `fcntl.flock` alone. The kernel drops a flock when its process ends,
however it ends (`kill -9` included), so a lock file is stale exactly when
nobody holds its flock: no pid-liveness guesses. On NFS, Linux maps flock to
NFS byte-range locks, which hold across clients; the lock of a client that
went down stays until the server drops it, hence the "delete .lock" hint.

Why not `filelock` (4.3.2 here, ~15,800 lines, installed only for
huggingface_hub, so it would become a declared dependency): it would take
the same flock, but the holder's record and the messages built from it, the
stale-lock notice and deleting the file on release (which its `FileLock`
leaves behind) would stay ours; its extras (timeouts, thread-local
reentrancy, Windows, soft locks) are unused. The previous version's Windows
fallback (liveness from the pid; 137 code lines, now 96) went too: the
project runs on Linux and macOS (phones through export), and the fallback
was never run on Windows (the tests need POSIX).
"""

import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """The run directory is held by a live process; the message names it."""


class RunLock:
    """Holds `<run_dir>/.lock` while a run writes its directory.

    The lock file records the holder (pid, host, start time and command), who
    keeps an exclusive `flock` on it. A lock file that nobody holds is stale
    (its process died): it is taken over, and `log` says so. `release()` (or
    leaving the `with` block, also on an exception or `SystemExit`) deletes
    the file.

    Args:
        run_dir: the directory to lock; created if missing.
        command: what to record as the holder's command (default `sys.argv`).
        log: callable for the stale-lock message.

    Example:

    ```python
    with RunLock("runs/demo"):
        ...  # write runs/demo/
    ```

    Raises:
        RunLockedError: from `acquire()`, when a live process holds the lock.
    """

    def __init__(self, run_dir, command=None, log=print):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self.command = list(sys.argv if command is None else command)
        self.log = log
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()

    def _holder(self, fd):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            holder = json.loads(os.read(fd, 1 << 16).decode("utf-8", "replace"))
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _describe(self, holder):
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        command = " ".join(str(c) for c in holder.get("command", [])) or "unknown command"
        return f"pid {pid} on {host}, started {holder.get('started', '?')}: {command}"

    def _refuse(self, holder):
        pid = holder.get("pid")
        stop = f"stop it (kill {pid}), " if pid and holder.get("host") == socket.gethostname() else ""
        return RunLockedError(
            f"{self.run_dir} is in use by another run ({self._describe(holder)}). Wait for it to "
            f"finish, {stop}or choose another --run-dir. If no such process is running (e.g. it "
            f"ran on another machine that went down), delete {self.path} and rerun."
        )

    def _try_once(self):
        """The lock file's fd, flocked, or None to retry: the holder released
        (deleted) the file between our open and our flock."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                if not holder:  # being written: read once more
                    time.sleep(0.2)
                    holder = self._holder(fd)
                raise self._refuse(holder) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            return None
        holder = self._holder(fd)  # empty unless its process died holding it
        if holder:
            self.log(f"Taking over the stale lock of {self.run_dir} ({self._describe(holder)}; "
                     "that process is gone).")
        return fd

    def acquire(self):
        """Takes the lock. Returns self."""
        if self._fd is not None:
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(20):
            fd = self._try_once()
            if fd is not None:
                break
        else:
            raise RunLockedError(f"Could not lock {self.path}: other processes keep taking it.")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self):
        """Deletes the lock file and drops the lock; a no-op if not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.remove(self.path)  # while still holding it
        except OSError:
            pass
        finally:
            os.close(fd)
