"""The chunk database: boundaries, stable ids, resume after a kill, bad input, S3."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import kill_db_at_first_embedding, tiny_config

from retro_ray.core.config import StorageConfig
from retro_ray.core.manifest import StageMismatchError
from retro_ray.core.storage import Storage
from retro_ray.database import chunks, files, tokenizer
from retro_ray.database.corpus import BadInputError


def build(cfg, storage=None, force=False):
    storage = storage or Storage(cfg.storage)
    tokenizer.run(cfg, storage, force)
    return chunks.run(cfg, storage, force)


def read_chunks(workdir) -> dict:
    table = pq.read_table(workdir / "db" / "chunks")
    return table.sort_by("chunk_id").to_pydict()


def block_digests(manifest) -> dict:
    return {name: (b["rows"], b["chunks_sha256"], b["embeddings_sha256"]) for name, b in manifest.blocks.items()}


@pytest.fixture(scope="module")
def built(built_db):
    cfg, manifest = built_db
    return cfg, Path(cfg.workdir), manifest


def test_spans():
    assert chunks.chunk_spans(130, 64) == [(0, 64), (64, 128), (128, 130)]
    assert chunks.chunk_spans(0, 64) == []


def test_chunks_follow_documents_exactly(built, wiki_docs):
    cfg, workdir, manifest = built
    rows = read_chunks(workdir)
    n = len(rows["chunk_id"])
    assert rows["chunk_id"] == list(range(n)) and manifest.counts["chunks"] == n
    assert manifest.counts["docs"] == len(wiki_docs) == len(set(rows["doc_id"]))
    tok = tokenizer.load_run_tokenizer(cfg, Storage())
    for doc_id, doc in enumerate(wiki_docs):
        idx = [i for i in range(n) if rows["doc_id"][i] == doc_id]
        assert [rows["doc_pos"][i] for i in idx] == list(range(len(idx)))
        lengths = [len(rows["tokens"][i]) for i in idx]
        assert all(length == 64 for length in lengths[:-1]) and 0 < lengths[-1] <= 64
        assert sum((rows["tokens"][i] for i in idx), []) == tok(doc["text"])["input_ids"]
        assert "".join(rows["text"][i] for i in idx) == doc["text"]
        assert {rows["title"][i] for i in idx} == {doc["title"]}  # each chunk knows its document's title
    store = files.ChunkStore.open(Storage(), str(workdir / "db"), sorted(manifest.blocks))
    for c in range(n):  # a chunk's continuation (what a neighbour carries) is the next one of its document
        assert store.is_last_of_doc(c) == (c + 1 == n or rows["doc_id"][c + 1] != rows["doc_id"][c])


def test_blocks_are_named_by_range_and_aligned_with_embeddings(built):
    _, workdir, manifest = built
    names = sorted(manifest.blocks)
    assert names[0] == "000000000000-000000000016"
    for name in names:
        start, end = files.block_range(name)
        ids = pq.read_table(workdir / "db" / "chunks" / f"{name}.parquet").column("chunk_id").to_pylist()
        emb = pq.read_table(workdir / "db" / "embeddings" / f"{name}.parquet")
        assert ids == list(range(start, end)) == emb.column("chunk_id").to_pylist()
        emb_type = emb.schema.field("embedding").type
        assert (emb_type.list_size, emb_type.value_type) == (384, pa.float16())


def test_rebuild_gives_the_same_ids_and_bytes(built, tmp_path):
    cfg, _, manifest = built
    again = build(tiny_config(tmp_path, *cfg.corpus.sources[0].paths))
    assert block_digests(again) == block_digests(manifest)


def test_rerun_skips_and_changed_config_needs_force(built):
    cfg, _, manifest = built
    assert block_digests(chunks.run(cfg, Storage())) == block_digests(manifest)
    changed = cfg.model_copy(update={"db": cfg.db.model_copy(update={"block_size": 32})})
    with pytest.raises(StageMismatchError, match="--force"):
        chunks.run(changed, Storage())


@pytest.mark.slow  # a drill
def test_killed_build_resumes_to_identical_output(built, tmp_path):
    cfg, _, manifest = built
    cfg = tiny_config(tmp_path / "run", *cfg.corpus.sources[0].paths)
    tokenizer.run(cfg, Storage())
    partial = kill_db_at_first_embedding(cfg, tmp_path, timeout_s=240)
    done = [n for n, b in partial["blocks"].items() if "embeddings_sha256" in b]
    assert not partial["complete"] and 0 < len(done) < len(manifest.blocks)

    resumed = chunks.run(cfg, Storage())
    assert resumed.complete
    assert block_digests(resumed) == block_digests(manifest)
    for name in done:  # finished blocks were kept, not recomputed
        assert resumed.blocks[name]["embed_s"] == partial["blocks"][name]["embed_s"]


def test_bad_input_is_counted_or_fails_fast(ray_local, tmp_path, bad_jsonl):
    manifest = build(tiny_config(tmp_path / "lenient", bad_jsonl))
    assert manifest.skipped == {"empty": 2, "malformed_json": 1, "missing_text_field": 1, "non_utf8": 1}
    assert manifest.counts["docs"] == 3
    strict = tiny_config(tmp_path / "strict", bad_jsonl, strict=True)
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2: malformed_json"):
        build(strict)


def test_max_docs_stops_early(ray_local, tmp_path, wiki_parquet):
    manifest = build(tiny_config(tmp_path, wiki_parquet, corpus={"max_docs": 3}))
    assert manifest.counts["docs"] == 3


def test_s3_corpus_and_workdir_on_moto_server(built, s3_endpoint, wiki_parquet):
    cfg, _, manifest = built
    storage = Storage(StorageConfig(s3_endpoint=s3_endpoint))
    storage.write_bytes("s3://retro/corpus/wiki.parquet", wiki_parquet.read_bytes())
    s3_cfg = tiny_config("s3://retro/run", "s3://retro/corpus/*.parquet",
                         storage={"s3_endpoint": s3_endpoint})
    s3_manifest = build(s3_cfg, storage)
    assert block_digests(s3_manifest) == block_digests(manifest)
    assert storage.expand("s3://retro/run/db/embeddings") == [
        f"s3://retro/run/db/embeddings/{name}.parquet" for name in sorted(manifest.blocks)
    ]
