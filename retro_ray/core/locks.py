"""One run at a time per stage folder: a lock file per folder, naming its owner.

A stage holds the locks of the folders it writes and of those it reads, so a second run that
would rebuild (``--force``) or write any of them is refused with the holder's host, PID, command
and start time, instead of deleting files under the first run's feet. Locks live in
``{workdir}/_locks/{folder}.json`` (outside the stage folders, which ``--force`` deletes):

- taking one is an atomic create (``Storage.create_exclusive``: a hard link locally, a
  conditional put on S3), so two runs never both get it;
- the holder refreshes ``heartbeat`` every ``HEARTBEAT_S`` seconds from a background thread;
- a lock is stale, and is taken over, when its owner is on this host and its process is gone
  (PID not running, or running with another start time), or when it is on another host and its
  heartbeat is older than ``STALE_AFTER_S``.

Taking over a stale lock deletes it and creates it anew; two runs taking over the same stale lock
at the same moment can race there (S3 has no conditional delete), which a re-read of the owner in
the heartbeat reports. A live lock is never taken over.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

import psutil

from retro_ray.core.errors import UserError
from retro_ray.core.runtime import log
from retro_ray.core.storage import Storage, join

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

_held: dict[str, int] = {}  # lock uri -> depth, for this process: taking a lock twice is fine
_held_guard = threading.Lock()


class StageLockedError(UserError, RuntimeError):
    """Another run holds a stage folder this run needs."""


def lock_uri(workdir: str, folder: str) -> str:
    return join(workdir, "_locks", folder.replace("/", "--") + ".json")


def _owner() -> dict:
    proc = psutil.Process()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": proc.create_time(),
            "command": " ".join(["retro-ray" if i == 0 else a for i, a in enumerate(sys.argv)])[:200],
            "token": uuid.uuid4().hex, "heartbeat": time.time()}


def is_stale(holder: dict, now: float | None = None) -> bool:
    """Whether the run that wrote ``holder`` is gone."""
    if holder.get("host") == socket.gethostname():
        try:
            return abs(psutil.Process(holder["pid"]).create_time() - holder["started"]) > 1.0
        except (psutil.NoSuchProcess, KeyError):
            return True
    return (now or time.time()) - float(holder.get("heartbeat", 0)) > STALE_AFTER_S


class StageLock:
    """The lock of one stage folder; use ``stage_locks`` to take several."""

    def __init__(self, storage: Storage, workdir: str, folder: str):
        self.storage, self.folder = storage, join(workdir, folder)
        self.uri = lock_uri(workdir, folder)
        self.record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        with _held_guard:
            if _held.get(self.uri):
                _held[self.uri] += 1
                return
        record = _owner()
        data = json.dumps(record).encode()
        if not self.storage.create_exclusive(self.uri, data):
            holder = self._read()
            if holder is not None and not is_stale(holder):
                raise StageLockedError(
                    f"{self.folder} is in use by another run: {holder['command']!r} (host {holder['host']}, "
                    f"pid {holder['pid']}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}); "
                    f"wait for it to finish, or delete {self.uri} if that run is gone")
            if holder is not None:
                log.warning("taking over the stale lock of %s (pid %s on %s is gone)", self.folder,
                            holder["pid"], holder["host"])
            self.storage.delete_file(self.uri)
            if not self.storage.create_exclusive(self.uri, data):  # another run took it meanwhile
                raise StageLockedError(f"{self.folder} was just locked by another run; see {self.uri}")
        self.record = record
        with _held_guard:
            _held[self.uri] = 1
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lock {self.folder}")
        self._thread.start()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(self.uri))
        except (FileNotFoundError, OSError, ValueError):
            return None  # released (or being replaced) meanwhile

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = self._read()
            if current is None or current.get("token") != self.record["token"]:
                log.error("the lock of %s was taken by another run", self.folder)
                return
            self.record["heartbeat"] = time.time()
            self.storage.write_bytes(self.uri, json.dumps(self.record).encode())

    def release(self) -> None:
        with _held_guard:
            _held[self.uri] -= 1
            if _held[self.uri]:
                return
            del _held[self.uri]
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        current = self._read()
        if current is not None and current.get("token") == self.record["token"]:
            self.storage.delete_file(self.uri)


@contextlib.contextmanager
def stage_locks(storage: Storage, workdir: str, folders: list[str]) -> Iterator[None]:
    """Hold the locks of ``folders`` (relative to ``workdir``), taken in the given order; on a
    refusal the ones already taken are released and ``StageLockedError`` names the holder."""
    taken: list[StageLock] = []
    try:
        for folder in folders:
            lock = StageLock(storage, workdir, folder)
            lock.acquire()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()


def locked(*folders):
    """Decorator for a stage's ``run(cfg, storage, ...)``: hold the locks of ``folders`` (names
    relative to ``workdir``, or functions of the config giving one) while it runs."""
    def wrap(run):
        @functools.wraps(run)
        def locked_run(cfg, storage, *args, **kwargs):
            names = [f(cfg) if callable(f) else f for f in folders]
            with stage_locks(storage, cfg.workdir, names):
                return run(cfg, storage, *args, **kwargs)
        return locked_run
    return wrap
