"""Stage locks: atomic create (local and S3 conditional put), the holder named, stale locks."""

import json
import socket
import subprocess
import time

import pytest

from retro_ray.core.config import StorageConfig
from retro_ray.core.locks import StageLockedError, lock_uri, stage_locks
from retro_ray.core.storage import Storage

from robustness_cases import hold_lock


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_holder(storage: Storage, workdir: str, folder: str, **fields) -> str:
    uri = lock_uri(workdir, folder)
    record = {"host": socket.gethostname(), "pid": dead_pid(), "started": 0.0, "command": "old run",
              "token": "t", "heartbeat": time.time(), **fields}
    storage.write_bytes(uri, json.dumps(record).encode())
    return uri


def test_create_exclusive_refuses_an_existing_file(tmp_path, s3_endpoint):
    for storage, root in ((Storage(), str(tmp_path)), (Storage(StorageConfig(s3_endpoint=s3_endpoint)), "s3://retro/x")):
        uri = f"{root}/lock.json"
        assert storage.create_exclusive(uri, b"first")
        assert not storage.create_exclusive(uri, b"second")
        assert storage.read_bytes(uri) == b"first"


def test_live_holder_is_named_and_lock_is_released_after_use(tmp_path):
    storage, workdir = Storage(), str(tmp_path)
    path = hold_lock(tmp_path, "db")
    with pytest.raises(StageLockedError, match=r"db is in use by another run: 'holder-of-the-lock' \(host .*, pid \d+"):
        with stage_locks(storage, workdir, ["tokenizer", "db"]):
            pass
    assert not storage.exists(lock_uri(workdir, "tokenizer"))  # the lock taken before the refusal is released
    path.unlink()
    with stage_locks(storage, workdir, ["tokenizer", "db"]):
        holder = json.loads(path.read_text())
        assert holder["pid"] > 0 and holder["host"] == socket.gethostname()
        with stage_locks(storage, workdir, ["db"]):  # the same process may take it again
            pass
        assert path.exists()
    assert not path.exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    storage, workdir = Storage(), str(tmp_path)
    write_holder(storage, workdir, "db")
    with stage_locks(storage, workdir, ["db"]):
        assert json.loads(storage.read_bytes(lock_uri(workdir, "db")))["command"] != "old run"


def test_lock_of_another_host_is_stale_only_once_its_heartbeat_is_old(s3_endpoint):
    storage, workdir = Storage(StorageConfig(s3_endpoint=s3_endpoint)), "s3://retro/locked-run"
    write_holder(storage, workdir, "index", host="other-host")
    with pytest.raises(StageLockedError, match="host other-host"):
        with stage_locks(storage, workdir, ["index"]):
            pass
    write_holder(storage, workdir, "index", host="other-host", heartbeat=time.time() - 3600)
    with stage_locks(storage, workdir, ["index"]):
        assert json.loads(storage.read_bytes(lock_uri(workdir, "index")))["host"] == socket.gethostname()
    assert not storage.exists(lock_uri(workdir, "index"))
