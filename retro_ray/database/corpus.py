"""Read documents (JSONL, Parquet, plain text; local or S3; blends) with Ray Data.

Every input row becomes one output row, good or bad, so nothing is dropped silently:

    source  name of the corpus in the config
    path    the file (``s3://`` kept)
    row     1-based line (JSONL) or row (Parquet) in that file; 1 for a text file
    title   the document's title (``title_field``; a text file's name), "" when it has none
    text    the document, or null when the row is skipped
    skip    "" for a document, else the reason (see ``BAD_INPUT``, plus ``blend_weight``)

The embedded default corpus (``builtin:pydocs``) is made from the documentation shipped with
Python itself, so the quick start runs on any machine with Python and no downloads.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from retro_ray.core.config import Config, ConfigError, CorpusSource
from retro_ray.core.errors import UserError
from retro_ray.core.layout import corpus_file
from retro_ray.core.storage import Storage

if TYPE_CHECKING:
    import ray.data

BUILTIN_PYDOCS = "builtin:pydocs"
BAD_INPUT = ("malformed_json", "missing_text_field", "non_utf8", "invalid_unicode", "empty")
"""Skip reasons that are bad input: counted, or an error at the first one under ``strict``."""

SCHEMA = pa.schema(
    [("source", pa.string()), ("path", pa.string()), ("row", pa.int64()), ("title", pa.string()),
     ("text", pa.string()), ("skip", pa.string())]
)


class BadInputError(UserError, ValueError):
    """A bad input row under ``strict: true``; the message names the file and the row."""


def describe_skip(row: dict) -> str:
    return f"{row['path']}:{row['row']}: {row['skip']}"


def describe_skips(skipped: dict[str, int]) -> str:
    """Skip counts per reason, ``empty=2, malformed_json=1``, sorted; ``none`` when there are none."""
    return ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"


def bad_rows(skipped: dict[str, int]) -> dict[str, int]:
    """The counts of ``skipped`` that are bad input (not blend weights)."""
    return {k: v for k, v in skipped.items() if k in BAD_INPUT}


def kept_by_weight(source: str, path: str, row: int, weight: float) -> bool:
    """Stable per-document coin flip for blend weights: the same documents on every rerun."""
    if weight >= 1.0:
        return True
    digest = hashlib.blake2b(f"{source}\0{path}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < weight


def builtin_pydocs() -> list[dict]:
    """The embedded corpus: Python's ``pydoc`` topics and every stdlib module's docstring."""
    from pydoc_data.topics import topics

    docs = [{"title": name, "text": f"{name}\n\n{body}"} for name, body in sorted(topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    for file in sorted(stdlib.rglob("*.py")):
        if skip_dirs.intersection(file.relative_to(stdlib).parts):
            continue
        try:
            doc = ast.get_docstring(ast.parse(file.read_bytes()))
        except (SyntaxError, ValueError):  # a few stdlib files are templates, not Python
            continue
        if doc:
            parts = file.relative_to(stdlib).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            docs.append({"title": module, "text": f"{module}\n\n{doc}"})
    return docs


def materialize_builtin(storage: Storage, workdir: str) -> str:
    """Write the embedded corpus as JSONL under the run (once) and return its URI."""
    uri = corpus_file(workdir, "pydocs.jsonl")
    if not storage.exists(uri):
        lines = (json.dumps(d, ensure_ascii=False) for d in builtin_pydocs())
        storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    return uri


def detect_format(source: CorpusSource, path: str) -> str:
    if source.format != "auto":
        return source.format
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "text"


def _parse_line(line: bytes, source: CorpusSource) -> tuple[str | None, str, str]:
    """(text, skip reason, title) of one JSONL line."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8", ""
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError:
        return None, "malformed_json", ""
    if not isinstance(obj, dict) or not isinstance(obj.get(source.text_field), str):
        return None, "missing_text_field", ""
    title = _title(obj.get(source.title_field) if source.title_field else None)
    try:  # valid JSON may still hold lone surrogates ("\ud800"), which no UTF-8 column can store
        (obj[source.text_field] + title).encode("utf-8")
    except UnicodeEncodeError:
        return None, "invalid_unicode", ""
    return obj[source.text_field], "", title


def _title(value) -> str:
    """A title on one line; anything that is not a string is no title."""
    return " ".join(value.split()) if isinstance(value, str) else ""


def _iter_lines(f, read_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a byte stream without their newline, read in large pieces."""
    tail = b""
    while data := f.read(read_size):
        lines = (tail + data).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def range_lines(f, lo: int, hi: int) -> Iterator[bytes]:
    """The lines (without newline) of a seekable file that start in bytes [lo, hi): byte ranges
    that tile a file give each of its lines exactly once."""
    start = 0
    if lo > 0:  # the first line start at or after lo: just past a newline at lo - 1 or later
        f.seek(lo - 1)
        start = lo - 1
        while True:
            data = f.read(1 << 16)
            if not data:
                return
            if (i := data.find(b"\n")) >= 0:
                start += i + 1
                break
            start += len(data)
        f.seek(start)
    for line in _iter_lines(f):
        if start >= hi:
            return
        yield line
        start += len(line) + 1


def count_newlines(f, lo: int, hi: int) -> int:
    """Newlines in bytes [lo, hi) of a seekable file."""
    f.seek(lo)
    count, left = 0, hi - lo
    while left > 0 and (data := f.read(min(left, 1 << 24))):
        count += data.count(b"\n")
        left -= len(data)
    return count


def _rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def read_source_file(
    f, path: str, fmt: str, source: CorpusSource, batch_rows: int = 256, max_rows: int | None = None,
    row_groups: list[int] | None = None, first_row: int = 0, part: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """Yield tables of ``SCHEMA`` rows for one open file ``f`` (streamed, never whole), stopping
    after ``max_rows`` rows. A part of a file (one chunking task's unit) is read when given: of a
    Parquet file, its ``row_groups``, and of those only rows [``part``) when given; of a JSONL
    file (opened seekable), the lines that start in bytes [``part``). The part's first row is
    row ``first_row + 1`` of the file."""
    for table in _read_rows(f, path, fmt, source, batch_rows, row_groups, first_row, part):
        if max_rows is not None and table.num_rows >= max_rows:
            yield table.slice(0, max_rows)
            return
        if max_rows is not None:
            max_rows -= table.num_rows
        yield table


def _read_rows(f, path: str, fmt: str, source: CorpusSource, batch_rows: int,
               row_groups: list[int] | None, first_row: int, part: tuple[int, int] | None) -> Iterator[pa.Table]:
    rows: list[dict] = []

    def emit(row: int, text: str | None, skip: str, title: str = "") -> None:
        if not skip and not (text and text.strip()):
            text, skip = None, "empty"
        if not skip and not kept_by_weight(source.name, path, row, source.weight):
            text, skip = None, "blend_weight"
        rows.append({"source": source.name, "path": path, "row": row, "title": title if not skip else "",
                     "text": text if not skip else None, "skip": skip})

    if fmt == "parquet":
        pf = pq.ParquetFile(f)
        if source.text_field not in pf.schema_arrow.names:  # checked up front; the file changed since
            raise _missing_column(source, path, pf.schema_arrow.names)
        columns = [source.text_field]
        if source.title_field and source.title_field in pf.schema_arrow.names:
            columns.append(source.title_field)
        row, seen = first_row, 0
        lo, hi = part or (0, None)
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=columns):
            seen += batch.num_rows
            if seen <= lo:
                continue
            batch = batch.slice(max(0, lo - seen + batch.num_rows))
            if hi is not None and seen > hi:
                batch = batch.slice(0, max(0, batch.num_rows - (seen - hi)))
            titles = batch.column(1).to_pylist() if len(columns) > 1 else [None] * batch.num_rows
            for text, title in zip(batch.column(0).to_pylist(), titles):
                row += 1
                emit(row, text, "" if isinstance(text, str) else "missing_text_field", _title(title))
            yield _rows_to_table(rows)
            rows.clear()
            if hi is not None and seen >= hi:
                return
        return
    if fmt == "text":  # one document per file, titled by its name
        data = f.read()
        title = _title(path.rsplit("/", 1)[-1].rsplit(".", 1)[0]) if source.title_field else ""
        try:
            emit(1, data.decode("utf-8"), "", title)
        except UnicodeDecodeError:
            emit(1, None, "non_utf8")
        yield _rows_to_table(rows)
        return
    for row, line in enumerate(range_lines(f, *part) if part else _iter_lines(f), start=first_row + 1):
        line = line.rstrip(b"\r")
        if not line.strip():
            emit(row, None, "empty")
        else:
            emit(row, *_parse_line(line, source))
        if len(rows) >= batch_rows:
            yield _rows_to_table(rows)
            rows.clear()
    if rows:
        yield _rows_to_table(rows)


def _datasource(source: CorpusSource, paths: list[str], storage: Storage, max_rows: int | None):
    from ray.data.datasource import FileBasedDatasource

    class CorpusDatasource(FileBasedDatasource):
        """One corpus's files, each streamed by ``read_source_file``."""

        def _open_input_source(self, filesystem, path, **open_args):
            if detect_format(source, path) == "parquet":  # needs random access
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            shown = f"s3://{path}" if paths[0].startswith("s3://") else path
            yield from read_source_file(f, shown, detect_format(source, path), source, max_rows=max_rows)

    fs, _ = storage.resolve(paths[0])
    fs_paths = [storage.resolve(p)[1] for p in paths]
    return CorpusDatasource(fs_paths, filesystem=fs, schema=SCHEMA)


def source_files(cfg: Config, storage: Storage) -> dict[str, list[str]]:
    """Every corpus's files (sorted), with the embedded corpus written out first if named."""
    files: dict[str, list[str]] = {}
    for source in cfg.corpus.sources:
        found: list[str] = []
        for pattern in source.paths:
            if pattern == BUILTIN_PYDOCS:
                found.append(materialize_builtin(storage, cfg.workdir))
                continue
            matched = storage.expand(pattern)
            if not matched:
                raise ConfigError(f"corpus {source.name!r}: no files match {pattern!r}")
            found.extend(matched)
        files[source.name] = found
        _check_parquet_columns(source, found, storage)
    return files


def _check_parquet_columns(source: CorpusSource, paths: list[str], storage: Storage) -> None:
    """A Parquet file without the text column is a config mistake (``text_field``), not a bad
    row: found from the file footers before any work, not halfway through a build."""
    for path, meta in parquet_footers(source, paths, storage).items():
        names = meta.schema.to_arrow_schema().names
        if source.text_field not in names:
            raise _missing_column(source, path, names)


def parquet_footers(source: CorpusSource, paths: list[str], storage: Storage) -> dict[str, pq.FileMetaData]:
    """The footer of each Parquet file of ``paths`` (read 16 at a time: on S3 each is a request)."""
    from concurrent.futures import ThreadPoolExecutor

    parquet = [p for p in paths if detect_format(source, p) == "parquet"]

    def footer(path: str) -> pq.FileMetaData:
        fs, fs_path = storage.resolve(path)
        with fs.open_input_file(fs_path) as f:
            return pq.ParquetFile(f).metadata

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(parquet, pool.map(footer, parquet)))


def _missing_column(source: CorpusSource, path: str, names: list[str]) -> BadInputError:
    return BadInputError(f"{path}: no column {source.text_field!r} (columns: {', '.join(names)}); "
                         f"set text_field of corpus {source.name!r}")


def read_corpus(cfg: Config, storage: Storage, files: dict[str, list[str]]) -> list["ray.data.Dataset"]:
    """One Ray Dataset of ``SCHEMA`` rows per corpus, in config order; read them one after the
    other for the blend in config, file and row order (``Dataset.union`` interleaves its inputs).
    With ``max_docs`` they hold the first that-many rows of the blend together."""
    import ray.data

    datasets, remaining = [], cfg.corpus.max_docs
    for source in cfg.corpus.sources:
        if remaining == 0:
            break
        ds = ray.data.read_datasource(_datasource(source, files[source.name], storage, remaining),
                                      resources=cfg.resources.chunk)
        if remaining is not None:
            ds = ds.limit(remaining)
            remaining -= ds.count()  # quick runs only: this reads the source's first rows once more
        datasets.append(ds)
    return datasets
