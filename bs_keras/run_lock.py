"""`RunLock`: at most one training process writes a run directory."""

import json
import os
import socket
import sys
import time

try:
    import fcntl
except ImportError:  # Windows: liveness from the pid alone
    fcntl = None

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """The run directory is held by a live process; the message names it."""


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


class RunLock:
    """Holds `<run_dir>/.lock` while a run writes its directory.

    The lock file is created with `O_CREAT | O_EXCL` and records the
    holder: pid, host, start time and command. The holder also keeps an
    exclusive `flock` on it, which the kernel drops when the process ends
    however it ends (`kill -9` included), so a lock file that nobody holds
    is stale: it is taken over, and `log` says so. Without `fcntl`
    (Windows) a lock is stale when its pid is not running on this host.
    `release()` (or leaving the `with` block, also on an exception or
    `SystemExit`) deletes the file.

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

    def _holder(self, fd=None):
        try:
            if fd is not None:
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, 1 << 16).decode("utf-8", "replace")
            else:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            holder = json.loads(text)
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
        """The locked fd, or None to retry (the file changed under us)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:  # released meanwhile
                return None
            created = False
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = self._holder(fd)
                    if not holder:  # being written: read once more
                        time.sleep(0.2)
                        holder = self._holder(fd)
                    raise self._refuse(holder)
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # deleted (released) between our open and flock
                    os.close(fd)
                    return None
            if not created:
                holder = self._holder(fd)
                mine = holder.get("host") == socket.gethostname()
                if fcntl is None and (not mine or _pid_alive(holder.get("pid", -1))):
                    raise self._refuse(holder)
                if holder:
                    self.log(f"Taking over the stale lock of {self.run_dir} ({self._describe(holder)}; "
                             "that process is gone).")
            return fd
        except BaseException:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise

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
            if fcntl is not None:  # unlink while still holding it
                os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)
        if fcntl is None:
            try:
                os.remove(self.path)
            except OSError:
                pass
