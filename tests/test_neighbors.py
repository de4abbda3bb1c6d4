"""The neighbour stage on a real (tiny) database with an exact index."""

import hashlib
import json

import numpy as np
import pytest

from conftest import kill_stage, read_split, reference_samples

from retro_ray.core.errors import UserError
from retro_ray.core.layout import db_dir, index_dir
from retro_ray.core.storage import Storage
from retro_ray.database import tokenizer
from retro_ray.database.files import ChunkStore, read_vectors
from retro_ray.retrieval import index, neighbors


SEQ = 256  # 4 chunks of 64


@pytest.fixture(scope="module")
def retrieved(built_db):
    cfg, db_manifest = built_db
    cfg = cfg.model_copy(update={
        "index": cfg.index.model_copy(update={"factory": "Flat", "shards": 2}),
        "neighbors": cfg.neighbors.model_copy(update={
            "seq_len": SEQ, "k": 2, "k_candidates": 8, "valid_fraction": 0.25, "samples_per_block": 4}),
    })
    storage = Storage()
    index.run(cfg, storage, force=True)
    manifest = neighbors.run(cfg, storage, force=True)
    store = ChunkStore.open(storage, db_dir(cfg), sorted(db_manifest.blocks))
    eod = tokenizer.load_run_tokenizer(cfg, storage).convert_tokens_to_ids(cfg.tokenizer.eod_token)
    return cfg, manifest, store, eod


def _split(cfg, split):
    table = read_split(cfg, split)
    return {name: neighbors._fixed_list_numpy(table.column(name), 2 if name == "neighbors" else 1)
            for name in ("tokens", "chunk_ids", "chunk_doc_ids", "chunk_lengths", "neighbors")}


def test_index_layout_and_exact_recall(retrieved):
    cfg, *_ = retrieved
    layout = json.loads((Storage().read_bytes(index_dir(cfg) + "/layout.json")))
    assert layout["factory"] == "Flat" and len(layout["shards"]) == 2
    assert sum(s["rows"] for s in layout["shards"]) == layout["shards"][-1]["range"][1]
    assert index.verify(cfg, Storage(), queries=50, k=5)["recall_at_5"] == 1.0


def test_every_chunk_is_laid_out_once_in_its_split(retrieved):
    cfg, manifest, store, eod = retrieved
    train, valid = _split(cfg, "train"), _split(cfg, "valid")
    seen = np.concatenate([train["chunk_ids"].ravel(), valid["chunk_ids"].ravel()])
    assert sorted(seen[seen >= 0].tolist()) == list(range(len(store)))
    train_docs, valid_docs = set(train["chunk_doc_ids"].ravel()) - {-1}, set(valid["chunk_doc_ids"].ravel()) - {-1}
    assert valid_docs and not train_docs & valid_docs
    assert all(neighbors.is_valid_doc(d, 0.25) for d in valid_docs)
    assert manifest.counts["train_samples"] == len(train["tokens"])
    for part in (train, valid):
        assert part["tokens"].shape[1] == SEQ and part["chunk_ids"].shape[1] == SEQ // 64


def test_sample_tokens_are_database_chunks_then_eod(retrieved):
    cfg, _, store, eod = retrieved
    part = _split(cfg, "train")
    for tokens, ids, lengths in zip(part["tokens"], part["chunk_ids"], part["chunk_lengths"]):
        for j, (c, length) in enumerate(zip(ids, lengths)):
            chunk = tokens[j * 64:(j + 1) * 64]
            if c < 0:
                assert (chunk == eod).all() and length <= 1
                continue
            n = len(store.tokens(c))
            assert (chunk[:n] == store.tokens(c)).all() and (chunk[n:] == eod).all()
            assert length == (n + 1 if store.is_last_of_doc(c) and n < 64 else n)


def test_neighbors_are_the_exact_top_k_outside_the_sample(retrieved):
    cfg, _, store, _ = retrieved
    db_blocks = sorted(Storage().read_json(db_dir(cfg) + "/_manifest.json")["blocks"])
    vectors = read_vectors(Storage(), db_dir(cfg), db_blocks, np.arange(len(store)))
    checked = 0
    for split in ("train", "valid"):
        part = _split(cfg, split)
        for ids, docs, nbrs in zip(part["chunk_ids"], part["chunk_doc_ids"], part["neighbors"]):
            for c, row in zip(ids, nbrs):
                if c < 0:
                    assert (row == -1).all()
                    continue
                scores = vectors @ vectors[c]
                order = [i for i in np.argsort(-scores, kind="stable")[:8] if store.doc_id(i) not in set(docs)]
                expected = np.array((order + [-1, -1])[:2])
                assert ((row < 0) == (expected < 0)).all()  # equal up to ties: compare scores
                np.testing.assert_allclose(scores[row[row >= 0]], scores[expected[expected >= 0]], rtol=1e-5)
                assert not set(store.doc_ids_of(row[row >= 0]).tolist()) & set(docs)
                checked += 1
    assert checked > 50


def test_the_distributed_stage_writes_what_one_process_wrote(retrieved, tmp_path):
    cfg, manifest, *_ = retrieved
    assert {n: b["sha256"] for n, b in manifest.blocks.items()} == reference_samples(cfg, tmp_path)
    assert len(manifest.blocks) > 4  # several sample blocks, written by tasks


@pytest.mark.slow  # a drill
def test_a_kill_after_the_first_sample_block_and_a_rerun_give_the_same_files(retrieved, tmp_path):
    cfg, first, *_ = retrieved
    storage = Storage()
    for stage in ("tokenizer", "db", "index"):  # the built stages under a new run directory
        storage.upload_dir(f"{cfg.workdir}/{stage}", f"{tmp_path}/run/{stage}")
    cfg = cfg.model_copy(update={"workdir": str(tmp_path / "run")})
    partial = kill_stage(cfg, tmp_path, "neighbors", str(tmp_path / "run" / "samples"), bool)
    assert 0 < len(partial["blocks"]) < len(first.blocks)
    resumed = neighbors.run(cfg, storage)
    assert resumed.blocks == first.blocks and resumed.counts == first.counts
    for name, block in resumed.blocks.items():
        assert hashlib.sha256((tmp_path / "run" / "samples" / f"{name}.parquet").read_bytes()).hexdigest() == block["sha256"]
    assert not (tmp_path / "run" / "samples" / "_journal").exists()  # folded into the manifest


def test_filter_neighbors_keeps_rank_and_pads():
    cands = np.array([[[5, 6, 7, -1]]])
    cand_docs = np.array([[[1, 2, 3, -1]]])
    assert neighbors.filter_neighbors(cands, cand_docs, np.array([[2, -1]]), 2).tolist() == [[[5, 7]]]
    assert neighbors.filter_neighbors(cands, cand_docs, np.array([[1, 3]]), 2).tolist() == [[[6, -1]]]


def test_dataset_shapes_and_padding(retrieved):
    cfg, _, store, eod = retrieved
    data = neighbors.RetroSamples(cfg, Storage(), "train", store=store)
    item = data[0]
    assert item["tokens"].shape == (SEQ,) and item["tokens"].dtype == np.int64
    assert item["neighbors"].shape == item["neighbor_mask"].shape == (4, 2, 128)
    for j in range(4):
        for n in range(2):
            c = data.row(0)["neighbors"][j, n]
            toks, mask = item["neighbors"][j, n], item["neighbor_mask"][j, n]
            if c < 0:
                assert not mask.any() and (toks == eod).all()
                continue
            expected = np.concatenate([store.tokens(c), [] if store.is_last_of_doc(c) else store.tokens(c + 1)])
            assert mask.sum() == len(expected) and (toks[mask] == expected).all() and (toks[~mask] == eod).all()


def test_show_prints_chunks_with_neighbour_text(retrieved):
    cfg, *_ = retrieved
    text = neighbors.show(cfg, Storage(), 0)
    assert text.startswith("train sample 0: 256 tokens") and "neighbour 1 (chunk" in text
    with pytest.raises(UserError, match="not in the train split"):
        neighbors.show(cfg, Storage(), 10_000)
