"""The database at scale: the parallel chunk pass against a one-process reference, embedding while
chunking goes on, resume after a kill mid-stream, and readers whose memory does not grow with
the database."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import WIKI, kill_db_at_first_embedding, reference_samples, tiny_config

from retro_ray.core.config import CorpusSource
from retro_ray.core.layout import db_dir, tokenizer_dir
from retro_ray.core.manifest import Manifest
from retro_ray.core.storage import Storage, join
from retro_ray.database import chunks, corpus, tokenizer
from retro_ray.database.files import CHUNK_SCHEMA, ChunkStore, block_name, write_token_block
from retro_ray.retrieval import index, neighbors


def reference_blocks(cfg, storage: Storage, out: Path) -> dict[str, str]:
    """The database's chunk blocks as one process numbers them (every corpus, file and row in
    blend order, ids counted as they come): block name -> SHA-256 of its file."""
    tokenizer_json = storage.read_bytes(join(tokenizer_dir(cfg), "tokenizer.json")).decode()
    files = corpus.source_files(cfg, storage)
    tables = []
    for source in cfg.corpus.sources:
        for path in files[source.name]:
            fmt = corpus.detect_format(source, path)
            with open(path, "rb") as f:
                for rows in corpus.read_source_file(f, path, fmt, source):
                    chunked = chunks.chunk_documents(rows, tokenizer_json, cfg.db.chunk_length)
                    tables.append(chunked.filter(pa.compute.equal(chunked.column("skip"), "")))
    kept = pa.concat_tables(tables)
    doc_pos = kept.column("doc_pos").to_numpy()
    table = pa.table([np.arange(kept.num_rows), np.cumsum(doc_pos == 0) - 1, kept.column("doc_pos"),
                      kept.column("tokens"), kept.column("text"), kept.column("title")], schema=CHUNK_SCHEMA)
    size = cfg.db.block_size
    return {block_name(s, min(s + size, len(table))): storage.write_parquet(
        str(out / f"{s}.parquet"), table.slice(s, size).combine_chunks()) for s in range(0, len(table), size)}


def built_blocks(manifest) -> dict[str, str]:
    return {name: b["chunks_sha256"] for name, b in manifest.blocks.items()}


@pytest.fixture(scope="module")
def wiki_texts() -> list[str]:
    return pq.read_table(WIKI, columns=["text"]).slice(0, 40).column("text").to_pylist()


def mixed_corpus(folder: Path, texts: list[str]) -> list[dict]:
    """Two corpora in a blend: JSONL with empty, malformed, short and long documents and a plain
    text file; a Parquet file of several row groups, kept at weight 0.7."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(texts[:20]):
        lines += {3: [""], 5: ["{not json"], 7: [json.dumps({"text": "short"})]}.get(i, [])
        lines.append(json.dumps({"text": text[: (i * 397) % 1500 + 1]}))
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "c.txt").write_text(texts[20][:800])
    pq.write_table(pa.table({"text": [t[:600] for t in texts[21:36]]}), folder / "b.parquet", row_group_size=4)
    return [CorpusSource(name="a", paths=[str(folder / "a.jsonl"), str(folder / "c.txt")]).model_dump(),
            CorpusSource(name="b", paths=[str(folder / "b.parquet")], weight=0.7).model_dump()]


def test_parallel_chunk_pass_equals_one_process_reference(ray_local, tmp_path, wiki_texts):
    sources = mixed_corpus(tmp_path / "corpus", wiki_texts)
    cfg = tiny_config(tmp_path / "run", *sources[0]["paths"], corpus={"sources": sources},
                      embed={"max_length": 32})
    storage = Storage()
    tokenizer.run(cfg, storage)
    manifest = chunks.run(cfg, storage)
    units = chunks.plan_units(cfg, storage, corpus.source_files(cfg, storage))
    assert len(units) == 2 + 4  # two files of corpus a, four row groups of corpus b
    assert built_blocks(manifest) == reference_blocks(cfg, storage, tmp_path / "ref")
    assert manifest.skipped["empty"] == 1 and manifest.skipped["malformed_json"] == 1
    assert manifest.skipped["blend_weight"] > 0 and not manifest.units
    assert not (tmp_path / "run" / "db" / "_staged").exists()  # staged units are removed
    # the token store holds the same tokens and documents as the blocks
    store = ChunkStore.open(storage, db_dir(cfg), sorted(manifest.blocks))
    table = pq.read_table(tmp_path / "run" / "db" / "chunks").sort_by("chunk_id")
    for c in (0, 17, table.num_rows - 1):
        assert store.tokens(c).tolist() == table.column("tokens")[c].as_py()
        assert store.doc_id(c) == table.column("doc_id")[c].as_py()
    # and the distributed neighbours stage on this blend writes what one process wrote
    cfg = cfg.model_copy(update={"index": cfg.index.model_copy(update={"factory": "Flat", "shards": 2}),
                                 "neighbors": cfg.neighbors.model_copy(update={
                                     "seq_len": 128, "k_candidates": 6, "valid_fraction": 0.3, "samples_per_block": 8})})
    index.run(cfg, storage)
    samples = neighbors.run(cfg, storage)
    assert {n: b["sha256"] for n, b in samples.blocks.items()} == reference_samples(cfg, tmp_path / "ref-samples")


def test_a_big_jsonl_file_and_a_big_row_group_are_read_by_many_tasks_into_the_same_chunks(built_db, tmp_path):
    rows = [json.dumps({"text": f"document {i} of a big file " * (1 + i % 7)}) if i % 997 else "{not json"
            for i in range(120_000)]
    (tmp_path / "big.jsonl").write_text("\n".join(rows) + "\n")  # about 12 MB
    pq.write_table(pa.table({"text": [f"row {i} of one big row group" for i in range(60_000)]}),
                   tmp_path / "big.parquet", row_group_size=60_000)  # one row group of about 2 MB
    sources = [CorpusSource(name="j", paths=[str(tmp_path / "big.jsonl")], weight=0.002).model_dump(),
               CorpusSource(name="p", paths=[str(tmp_path / "big.parquet")], weight=0.002).model_dump()]
    cfg = tiny_config(tmp_path / "run", str(tmp_path / "big.jsonl"), corpus={"sources": sources, "unit_mb": 1},
                      embed={"max_length": 32})
    storage = Storage()
    copy_tokenizer(Path(built_db[0].workdir), tmp_path / "run")
    manifest = chunks.run(cfg, storage)
    units = chunks.plan_units(cfg, storage, corpus.source_files(cfg, storage))
    assert sum(u.path.endswith(".jsonl") for u in units) >= 8 and sum(u.part is not None for u in units) >= 10
    assert built_blocks(manifest) == reference_blocks(cfg, storage, tmp_path / "ref")
    assert manifest.skipped["malformed_json"] == 121  # every bad line counted once, by no two tasks


def slow_corpus(path: Path, groups: int = 12, rows: int = 150_000) -> dict:
    """A large corpus of which a blend weight keeps about 30 short documents per row group:
    reading takes many seconds, embedding little, so a build spends most of its time chunking."""
    texts = pa.array([f"row {i} of a corpus that its blend weight mostly leaves out" for i in range(rows * groups)])
    pq.write_table(pa.table({"text": texts}), path, row_group_size=rows)
    return CorpusSource(name="slow", paths=[str(path)], weight=0.0002).model_dump()


def copy_tokenizer(src_workdir: Path, workdir: Path) -> None:
    """The tokenizer stage of another run (training one on a corpus read mostly to be skipped
    would take longer than the test)."""
    (workdir / "tokenizer").mkdir(parents=True)
    for f in (src_workdir / "tokenizer").iterdir():
        if f.is_file():
            (workdir / "tokenizer" / f.name).write_bytes(f.read_bytes())


@pytest.mark.slow  # a drill
def test_embedding_overlaps_chunking_and_a_kill_midway_resumes_identically(built_db, tmp_path):
    source = slow_corpus(tmp_path / "slow.parquet")
    cfg = tiny_config(tmp_path / "run", *source["paths"], corpus={"sources": [source]},
                      embed={"max_length": 32})
    storage = Storage()
    copy_tokenizer(Path(built_db[0].workdir), tmp_path / "run")
    partial = kill_db_at_first_embedding(cfg, tmp_path)
    assert "chunks" not in partial["counts"], "embedding began only after the chunk pass"
    assert partial["units"] and len(partial["units"]) < 12  # killed in the middle of the chunk pass
    written = sorted(partial["blocks"])
    # blocks are embedded as they are written, not in id order: the one recorded may not be the first
    embedded = [n for n, b in partial["blocks"].items() if "embeddings_sha256" in b]
    first_embedded = min((tmp_path / "run" / "db" / "embeddings" / f"{n}.parquet").stat().st_mtime for n in embedded)

    resumed = chunks.run(cfg, storage)
    assert resumed.complete and resumed.counts["docs"] == resumed.counts["chunks"]  # one chunk a document
    assert built_blocks(resumed) == reference_blocks(cfg, storage, tmp_path / "ref")
    for name in written:  # blocks written before the kill were kept
        assert resumed.blocks[name]["chunks_sha256"] == partial["blocks"][name]["chunks_sha256"]
    last_written = max(p.stat().st_mtime for p in (tmp_path / "run" / "db" / "chunks").iterdir())
    assert first_embedded < last_written


# -- memory that does not grow with the database ----------------------------------------------------

def synthetic_run(workdir: Path, src_workdir: Path, n_chunks: int, seed: int = 0) -> None:
    """A finished database of ``n_chunks`` random chunks (64 tokens, 4 a document) and its
    samples (4 chunks each, 2 neighbours a chunk drawn from the whole database), written with
    the stages' own file writers; no embeddings or index, which readers of samples never open."""
    storage, rng = Storage(), np.random.default_rng(seed)
    copy_tokenizer(src_workdir, workdir)
    db, block = str(workdir / "db"), 8192
    manifest = Manifest(stage="db", config_hash="synthetic", inputs={}, complete=True,
                        counts={"chunks": n_chunks, "docs": n_chunks // 4})
    for start in range(0, n_chunks, block):
        n = min(block, n_chunks - start)
        tokens = pa.ListArray.from_arrays(np.arange(0, 64 * n + 1, 64, dtype=np.int32),
                                          rng.integers(0, 500, 64 * n, dtype=np.int32))
        table = pa.table({"doc_id": np.arange(start, start + n) // 4, "tokens": tokens})
        manifest.blocks[block_name(start, start + n)] = {
            "rows": n, "tokens_sha256": write_token_block(storage, db, block_name(start, start + n), table)}
    manifest.save(storage, db)
    samples = Manifest(stage="neighbors", config_hash="synthetic", inputs={}, complete=True)
    for split, first, count in (("train", 0, n_chunks // 4 - 64), ("valid", n_chunks // 4 - 64, 64)):
        for s in range(0, count, 512):
            b = min(512, count - s)
            ids = (first + s + np.arange(b))[:, None] * 4 + np.arange(4)  # [b, 4]
            layout = neighbors.SampleLayout(ids, ids // 4, np.full(ids.shape, 64, np.int32))
            sample_tokens = rng.integers(0, 500, (b, 256), dtype=np.int32)
            near = rng.integers(0, n_chunks - 1, (b, 4, 2))
            name = f"{split}/{s:010d}-{s + b:010d}"
            storage.write_parquet(str(workdir / "samples" / f"{name}.parquet"),
                                  neighbors._block_table(s, sample_tokens, layout, slice(0, b), near))
            samples.blocks[name] = {"rows": b}
    samples.save(storage, str(workdir / "samples"))


READ_SAMPLES = """
import ctypes, sys, numpy as np
from retro_ray.core.config import Config
from retro_ray.core.storage import Storage
from retro_ray.retrieval.neighbors import RetroSamples

def held_mb():
    \"\"\"Private memory the reader holds: not file pages it can drop again, nor freed blocks the
    allocator keeps (run with Arrow on glibc's allocator, which hands them back when trimmed;
    Arrow's own pool kept 20 MB more in one CI run than in another).\"\"\"
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) / 1024

cfg = Config.model_validate({"workdir": sys.argv[1]})
data = RetroSamples(cfg, Storage(), "train")
before = held_mb()
for i in np.random.default_rng(0).permutation(len(data))[:512]:
    item = data[int(i)]
print(held_mb() - before, held_mb())
"""


def test_a_reader_of_samples_holds_the_same_memory_when_the_database_grows_4x(built_db, tmp_path):
    cfg, _ = built_db
    grown = {}
    for name, n_chunks in (("n", 50_000), ("4n", 200_000)):  # token stores of 13 MB and 51 MB
        synthetic_run(tmp_path / name, Path(cfg.workdir), n_chunks)
        out = subprocess.run([sys.executable, "-c", READ_SAMPLES, str(tmp_path / name)], capture_output=True,
                             text=True, check=True, env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"})
        grown[name] = [float(x) for x in out.stdout.split()]
    # loading all tokens and samples would hold some 40 MB more for the larger database
    assert grown["4n"][1] < grown["n"][1] + 15, grown


def test_token_store_on_s3_is_read_through_a_bounded_node_cache(s3_endpoint, tmp_path):
    from retro_ray.core.config import StorageConfig

    cache = tmp_path / "cache"
    storage = Storage(StorageConfig(s3_endpoint=s3_endpoint, cache_dir=str(cache), cache_gb=1.5e-6))  # ~1.6 KB
    db, rng, blocks = "s3://retro/scale-cache/db", np.random.default_rng(0), []
    expected = []
    for start in range(0, 40, 10):  # 4 blocks of 10 chunks, about 700 bytes each
        tokens = rng.integers(0, 500, (10, 8), dtype=np.int32)
        table = pa.table({"doc_id": np.arange(start, start + 10), "tokens": pa.array(tokens.tolist(), pa.list_(pa.int32()))})
        write_token_block(storage, db, block_name(start, start + 10), table)
        blocks.append(block_name(start, start + 10))
        expected += tokens.tolist()
    store = ChunkStore.open(storage, db, blocks)
    assert [store.tokens(c).tolist() for c in range(40)] == expected  # every block fetched once, mapped
    assert store.doc_ids_of(np.array([[39, -1], [0, 25]])).tolist() == [[39, -1], [0, 25]]
    cached = list(cache.iterdir())
    assert 1 <= len(cached) < 4 and sum(f.stat().st_size for f in cached) <= 1.5e-6 * 2**30 + 1000
    assert not [f for f in cached if ".tmp-" in f.name]
