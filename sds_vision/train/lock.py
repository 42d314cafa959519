"""Exclusive, crash-safe ownership of a folder: one process at a time may write a run.

``FolderLock(path).acquire()`` creates ``<path>/.lock`` atomically (``O_EXCL``) holding the
owner's host, pid and start time. A second process gets a one-line ``TrainError`` naming
the folder and the holder. The lock is released on exit (``release`` or the context
manager); a lock left by a process that died is *stale* and taken over: on the same host
when its pid no longer exists, on any host when its heartbeat (the file's mtime, touched
every ``heartbeat_s`` by a daemon thread) is older than ``stale_after_s``. So a run on a
shared filesystem (a Slurm array, Kubernetes jobs) is never run twice at once, and a dead
node's run is picked up by the next process that asks.

A process that holds a folder may lock it again (the benchmark harness claims a run folder,
then ``fit`` locks it): the inner lock is a no-op and the outer one keeps ownership.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from .config import TrainError

LOCK_FILE = ".lock"
BREAK_FILE = ".lock.break"  # held (O_EXCL) by the one process removing a stale lock
_HELD: dict[Path, "FolderLock"] = {}  # the locks this process holds, by lock-file path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    def __init__(self, folder: str | os.PathLike, heartbeat_s: float = 30.0,
                 stale_after_s: float = 600.0):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self._nested = False  # this process already held the folder when we acquired it
        self.pid = os.getpid()

    def holder(self) -> dict | None:
        """The current holder's record, or None when unlocked."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "started": 0.0}  # torn while being written

    def _is_stale(self, rec: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > self.stale_after_s:
            return True
        return rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", -1)))

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; False if a live process holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        outer = _HELD.get(key)
        if outer is not None and outer.held and outer.pid == os.getpid():  # not a forked child
            self.held = self._nested = True
            return True
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.time()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = self.holder()
                if rec is None:
                    continue  # released in between
                if not self._is_stale(rec):
                    return False
                self._break_stale(rec)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held, self.pid = True, os.getpid()
            _HELD[key] = self
            self._start_heartbeat()
            return True
        return False

    def _break_stale(self, rec: dict) -> None:
        """Remove the stale lock ``rec``, unless it changed meanwhile. One process at a time
        (an O_EXCL guard file): two processes that both found the lock stale could otherwise
        both remove it, the second one removing the fresh lock the first had just taken."""
        guard = self.folder / BREAK_FILE
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:  # a guard left by a process killed in the few lines below
                if time.time() - guard.stat().st_mtime > 60:
                    guard.unlink()
            except FileNotFoundError:
                pass
            return
        try:
            if self.holder() == rec and self._is_stale(rec):  # still the lock judged stale
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def acquire(self) -> "FolderLock":
        if not self.try_acquire():
            rec = self.holder() or {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("started", 0)))
            raise TrainError(f"{self.folder} is in use by another run (pid {rec.get('pid')} on "
                             f"{rec.get('host')}, since {since}); wait for it, or use another "
                             f"output folder")
        return self

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return
        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="folder-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if not self.held:
            return
        if self._nested:
            self.held = self._nested = False
            return
        _HELD.pop(self.path.resolve(), None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rec = self.holder()
        if rec is not None and rec.get("pid") == os.getpid() \
                and rec.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
