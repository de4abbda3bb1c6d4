import os

import pyarrow as pa
import pytest

from retro_ray.core.config import StorageConfig
from retro_ray.core.manifest import Manifest, StageMismatchError, open_stage
from retro_ray.core.storage import Storage, join


def _roundtrip(storage: Storage, root: str):
    storage.write_bytes(join(root, "a", "x.bin"), b"first")
    storage.write_bytes(join(root, "a", "x.bin"), b"second")  # overwrite is atomic, not append
    assert storage.read_bytes(join(root, "a", "x.bin")) == b"second"
    storage.write_json(join(root, "a", "m.json"), {"k": [1, 2]})
    assert storage.read_json(join(root, "a", "m.json")) == {"k": [1, 2]}
    table = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "t": ["a", "b", "c"]})
    sha = storage.write_parquet(join(root, "b", "000-003.parquet"), table)
    assert len(sha) == 64
    assert storage.read_parquet(join(root, "b", "000-003.parquet")).equals(table)
    assert storage.expand(join(root, "a")) == [join(root, "a", "m.json"), join(root, "a", "x.bin")]
    assert storage.expand(join(root, "*", "*.parquet")) == [join(root, "b", "000-003.parquet")]
    assert storage.expand(join(root, "missing")) == []
    assert storage.fingerprint(join(root, "a", "x.bin"))["size"] == len(b"second")


def test_local_roundtrip_leaves_no_temp_files(tmp_path):
    storage = Storage()
    _roundtrip(storage, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.json", "x.bin"]


def test_s3_roundtrip_on_moto_server(s3_endpoint):
    _roundtrip(Storage(StorageConfig(s3_endpoint=s3_endpoint)), "s3://retro/storage-test")


def test_s3_endpoint_from_environment(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    storage = Storage()
    storage.write_bytes("s3://retro/env/x", b"1")
    assert storage.exists("s3://retro/env/x")


def test_manifest_resumes_same_config_and_refuses_another(tmp_path):
    storage, folder = Storage(), str(tmp_path / "db")
    m = open_stage(storage, folder, "db", "hash-a", {"in": 1})
    m.blocks["000-010"] = {"rows": 10}
    m.save(storage, folder)
    storage.write_bytes(join(folder, "chunks", "000-010.parquet"), b"x")
    assert open_stage(storage, folder, "db", "hash-a", {"in": 1}).blocks == {"000-010": {"rows": 10}}
    with pytest.raises(StageMismatchError, match="different config.*--force"):
        open_stage(storage, folder, "db", "hash-b", {"in": 1})
    with pytest.raises(StageMismatchError, match=r"different inputs \(in changed\)"):
        open_stage(storage, folder, "db", "hash-a", {"in": 2})
    fresh = open_stage(storage, folder, "db", "hash-b", {"in": 1}, force=True)
    assert fresh.blocks == {} and not os.path.exists(join(folder, "chunks"))
    assert isinstance(fresh, Manifest)


def test_upload_and_download_dir_with_a_relative_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.json").write_text("{}")
    (tmp_path / "src" / "sub" / "b.txt").write_text("b")
    storage = Storage()
    storage.upload_dir(tmp_path / "src", "runs/x/tokenizer")  # relative, as in the default config
    out = storage.download_dir("runs/x/tokenizer", tmp_path / "back")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["a.json", "sub/b.txt"]


class CountingStorage(Storage):
    """Local storage that counts the bytes it writes."""

    written = 0

    def write_bytes(self, uri: str, data: bytes) -> None:
        self.written += len(data)
        super().write_bytes(uri, data)


def test_recording_a_block_writes_the_same_bytes_at_100_and_10000_blocks_and_resumes(tmp_path):
    storage, folder = CountingStorage(), str(tmp_path / "stage")
    m = open_stage(storage, folder, "samples", "hash", {"in": 1})
    per_block = {}
    for n in range(10_000):
        name = f"train/{n * 256:010d}-{(n + 1) * 256:010d}"
        m.blocks[name] = {"rows": 256, "sha256": "0" * 64}
        before = storage.written
        m.record(storage, folder, "blocks", name)
        if n + 1 in (100, 10_000):
            per_block[n + 1] = storage.written - before
    assert per_block[100] == per_block[10_000] < 300
    m.blocks["train/0000000000-0000000256"]["no_neighbor"] = 3  # a record written again replaces the last
    m.record(storage, folder, "blocks", "train/0000000000-0000000256")
    resumed = open_stage(storage, folder, "samples", "hash", {"in": 1})  # a killed stage, run again
    assert resumed.blocks == m.blocks and len(resumed.blocks) == 10_000
    resumed.units["7"] = {"rows": 1}
    resumed.complete = True
    resumed.save(storage, folder)  # the journal is folded into the manifest
    assert not os.path.exists(join(folder, "_journal"))
    assert Manifest.load(storage, folder).model_dump(exclude={"updated"}) == resumed.model_dump(exclude={"updated"})
