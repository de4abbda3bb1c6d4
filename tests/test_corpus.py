import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retro_ray.core.config import CorpusSource
from retro_ray.database.corpus import BadInputError, builtin_pydocs, kept_by_weight, read_source_file


def _rows(data: bytes, fmt: str, **source) -> list[dict]:
    src = CorpusSource(name="t", paths=["x"], **source)
    return [r for t in read_source_file(io.BytesIO(data), "f", fmt, src, batch_rows=3) for r in t.to_pylist()]


def test_every_bad_jsonl_row_is_kept_with_its_line_and_reason(bad_jsonl):
    rows = _rows(bad_jsonl.read_bytes(), "jsonl")
    assert [(r["row"], r["skip"]) for r in rows] == [
        (1, ""), (2, "malformed_json"), (3, "missing_text_field"), (4, "non_utf8"),
        (5, "empty"), (6, "empty"), (7, ""), (8, ""),
    ]
    assert all(r["text"] is None for r in rows if r["skip"])
    assert rows[0]["text"].startswith(rows[0]["text"][:20]) and rows[0]["path"] == "f"


def test_lone_surrogate_is_a_counted_bad_row_not_a_crash():
    """Valid JSON ("\\ud800") whose text no UTF-8 column can store."""
    rows = _rows(b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', "jsonl")
    assert [(r["row"], r["skip"]) for r in rows] == [(1, ""), (2, "invalid_unicode")]


def test_jsonl_text_field_is_configurable():
    rows = _rows(b'{"body": "hello"}\n{"text": "x"}\n', "jsonl", text_field="body")
    assert [(r["text"], r["skip"]) for r in rows] == [("hello", ""), (None, "missing_text_field")]


def test_parquet_rows_and_missing_column():
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a doc", None, "", "another"]}), buf)
    rows = _rows(buf.getvalue(), "parquet")
    assert [(r["row"], r["skip"]) for r in rows] == [(1, ""), (2, "missing_text_field"), (3, "empty"), (4, "")]
    with pytest.raises(BadInputError, match="f: no column 'body'"):
        _rows(buf.getvalue(), "parquet", text_field="body")


def test_text_files_are_one_document_each():
    assert [r["text"] for r in _rows(b"line one\nline two\n", "text")] == ["line one\nline two\n"]
    assert [r["skip"] for r in _rows(b"\xff\xfe", "text")] == ["non_utf8"]


def test_blend_weight_keeps_a_stable_fraction():
    kept = [kept_by_weight("wiki", "f", row, 0.3) for row in range(2000)]
    assert 0.25 < sum(kept) / len(kept) < 0.35
    assert kept == [kept_by_weight("wiki", "f", row, 0.3) for row in range(2000)]
    rows = _rows(b"\n".join(b'{"text": "doc %d"}' % i for i in range(200)), "jsonl", weight=0.5)
    reasons = {r["skip"] for r in rows}
    assert reasons == {"", "blend_weight"}


def test_builtin_corpus_is_python_documentation():
    docs = builtin_pydocs()
    titles = {d["title"] for d in docs}
    assert {"assignment", "json", "collections"} <= titles
    assert sum(len(d["text"]) for d in docs) > 500_000


def test_titles_come_from_the_title_field_and_a_missing_one_is_empty():
    rows = _rows(b'{"text": "a", "title": "  Ada\\nLovelace "}\n{"text": "b"}\n{"text": "c", "title": 7}\n', "jsonl")
    assert [r["title"] for r in rows] == ["Ada Lovelace", "", ""]
    assert [r["title"] for r in _rows(b'{"text": "a", "name": "Ada"}\n', "jsonl", title_field="name")] == ["Ada"]
    assert [r["title"] for r in _rows(b'{"text": "a", "title": "Ada"}\n', "jsonl", title_field=None)] == [""]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a doc", "another"], "title": ["First", None]}), buf)
    assert [r["title"] for r in _rows(buf.getvalue(), "parquet")] == ["First", ""]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a doc"]}), buf)  # no title column: no titles, no error
    assert [r["title"] for r in _rows(buf.getvalue(), "parquet")] == [""]
    assert [r["title"] for r in _rows(b"one doc", "text")] == ["f"]  # a text file: its name
