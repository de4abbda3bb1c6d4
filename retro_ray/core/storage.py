"""Every read and write of retro-ray: local paths and ``s3://`` URIs, atomic writes.

Files go through ``pyarrow.fs`` (the filesystem layer Ray Data and Ray Train use too), so a
``workdir`` or corpus on S3 or an S3-compatible store (MinIO, Ceph, moto) works by changing a
URI. Writes are atomic: a local file is written beside its target and renamed over it; an S3
object only appears when its upload completes. A reader never sees half a file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from retro_ray.core.config import StorageConfig

def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


class Storage:
    """Reads and writes local paths and ``s3://`` URIs alike."""

    def __init__(self, cfg: StorageConfig | None = None):
        self.cfg = cfg or StorageConfig()
        self._s3: pafs.S3FileSystem | None = None

    # -- resolution ----------------------------------------------------------------------

    def s3_filesystem(self) -> pafs.S3FileSystem:
        if self._s3 is None:
            kwargs: dict[str, Any] = {}
            endpoint = self.cfg.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                scheme, _, host = endpoint.rpartition("://")
                kwargs["endpoint_override"] = host or endpoint
                kwargs["scheme"] = scheme or "https"
            if self.cfg.s3_region:
                kwargs["region"] = self.cfg.s3_region
            self._s3 = pafs.S3FileSystem(**kwargs)
        return self._s3

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem and the path within it; hand both to Ray Data's readers."""
        if is_s3(uri):
            return self.s3_filesystem(), uri[len("s3://"):]
        return pafs.LocalFileSystem(), os.path.abspath(uri)

    def filesystem(self, uri: str) -> pafs.FileSystem:
        return self.resolve(uri)[0]

    def __getstate__(self) -> dict:  # the S3 client is rebuilt in each Ray worker
        return {"cfg": self.cfg, "_s3": None}

    # -- queries -------------------------------------------------------------------------

    def info(self, uri: str) -> pafs.FileInfo:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path)

    def exists(self, uri: str) -> bool:
        return self.info(uri).type != pafs.FileType.NotFound

    def fingerprint(self, uri: str) -> dict[str, Any]:
        """Size and modification time: what tells a rerun that an input changed."""
        info = self.info(uri)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(uri)
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        return {"size": info.size, "mtime": mtime}

    def expand(self, pattern: str) -> list[str]:
        """Files named by a path, a folder (all files below it) or a glob, sorted."""
        fs, path = self.resolve(pattern)
        prefix = "s3://" if is_s3(pattern) else ""
        if any(c in path for c in "*?["):
            parts = path.split("/")
            first_glob = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
            root = "/".join(parts[:first_glob]) or "/"
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
            found = [i.path for i in infos if i.is_file and fnmatch.fnmatchcase(i.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                found = [path]
            elif info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                found = [i.path for i in infos if i.is_file and not i.base_name.startswith((".", "_"))]
            else:
                found = []
        return sorted(prefix + p for p in found)

    # -- reads and atomic writes -----------------------------------------------------------

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` so that ``uri`` holds either the old content or all of the new."""
        fs, path = self.resolve(uri)
        parent = posixpath.dirname(path)
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(parent, recursive=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:  # an S3 object becomes visible only once its upload completes
            with fs.open_output_stream(path) as f:
                f.write(data)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create ``uri`` holding ``data`` only if it does not exist yet, atomically; False if it
        exists. Local: a complete temp file hard-linked into place (``link`` fails on an existing
        name). S3: a conditional put (``If-None-Match: *``), which AWS S3, MinIO and moto honour."""
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(posixpath.dirname(path), recursive=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            Path(tmp).write_bytes(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        try:
            self._boto3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def _boto3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.cfg.s3_endpoint, region_name=self.cfg.s3_region)

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        fs, path = self.resolve(uri)
        return pq.read_table(path, filesystem=fs, columns=columns)

    def write_parquet(self, uri: str, table: pa.Table, row_group_size: int | None = None) -> str:
        """Write ``table`` atomically; returns the SHA-256 of the file, for the manifest."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
        self.write_bytes(uri, buf.getvalue())
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def write_arrow(self, uri: str, table: pa.Table) -> str:
        """Write ``table`` atomically as an uncompressed Arrow IPC file, which readers memory-map
        (``open_arrow``); returns its SHA-256."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue().to_pybytes()
        self.write_bytes(uri, data)
        return hashlib.sha256(data).hexdigest()

    def open_arrow(self, uri: str) -> pa.Table:
        """An Arrow IPC file, memory-mapped: its pages are read when touched and can be dropped
        again, so a reader's memory does not grow with the file. A file on S3 is copied to the
        node's cache (``cache_dir``, at most ``cache_gb``) on its first use."""
        return pa.ipc.open_file(pa.memory_map(self.local_path(uri))).read_all()

    def local_path(self, uri: str) -> str:
        """A local path of ``uri``: itself, or for S3 a copy in the node's cache (``cache_dir``,
        at most ``cache_gb``), made on first use and shared by the node's processes."""
        if not is_s3(uri):
            return os.path.abspath(uri)
        cache = Path(self.cfg.cache_dir).expanduser()
        local = cache / hashlib.sha256(uri.encode()).hexdigest()[:32]
        if local.exists():
            os.utime(local)  # last use, for eviction
            return str(local)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(f".tmp-{uuid.uuid4().hex}")
        fs, path = self.resolve(uri)
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while data := src.read(1 << 24):
                dst.write(data)
        os.replace(tmp, local)  # atomic: processes of one node share the cache
        self._evict(cache, keep=local)
        return str(local)

    def _evict(self, cache: Path, keep: Path) -> None:
        """Remove the files used longest ago until the cache is within ``cache_gb``. A removed
        file stays readable by a process that has it mapped (POSIX unlink)."""
        files = []
        for f in cache.iterdir():
            try:
                if ".tmp-" not in f.name:
                    files.append((f.stat().st_mtime, f.stat().st_size, f))
            except FileNotFoundError:  # removed by another process meanwhile
                continue
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= self.cfg.cache_gb * 2**30:
                break
            if f != keep:
                f.unlink(missing_ok=True)
                total -= size

    def delete_dir(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    def delete_file(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)

    def upload_dir(self, local_dir: str | Path, uri: str) -> None:
        for file in sorted(Path(local_dir).rglob("*")):
            if file.is_file():
                self.write_bytes(join(uri, str(file.relative_to(local_dir))), file.read_bytes())

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        root = ("s3://" if is_s3(uri) else "") + self.resolve(uri)[1].rstrip("/")  # as expand() names files
        for src in self.expand(uri):
            rel = src[len(root) + 1:]
            (local_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (local_dir / rel).write_bytes(self.read_bytes(src))
        return local_dir
