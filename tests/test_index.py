"""Index shards and the router against brute-force Faiss, kills, S3 persistence, the stage."""

import json

import faiss
import numpy as np
import pytest
import ray

from index_actors.router import ShardedIndex, merge_topk, shard_actor
from index_actors.shard import IndexShard, TrainingSampleError, min_training_vectors
from retro_ray.core.config import StorageConfig
from retro_ray.core.storage import Storage
from retro_ray.retrieval import index

D = 32


def _data(n=3000, q=200, seed=0, d=D):
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    return xb, xb[rng.choice(n, q, replace=False)] + 0.05 * rng.standard_normal((q, d)).astype(np.float32)


def _exact(xb, xq, k):
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    return flat.search(xq, k)


def test_min_training_vectors():
    assert min_training_vectors("Flat") == 0 and min_training_vectors("HNSW32") == 0
    assert min_training_vectors("IVF1024,Flat") == 1024
    assert min_training_vectors("IVF64,PQ8") == 256
    assert min_training_vectors("OPQ16_64,IVF4096,PQ16x4") == 4096


def test_merge_never_turns_padding_into_ids():
    d1, i1 = np.array([[0.9, 0.5, -3e38]], np.float32), np.array([[7, 3, -1]])
    d2, i2 = np.array([[0.8, -3e38, -3e38]], np.float32), np.array([[11, -1, -1]])
    dist, ids = merge_topk([(d1, i1), (d2, i2)], 4, "ip")
    assert ids.tolist() == [[7, 11, 3, -1]]
    dist, ids = merge_topk([(np.array([[0.1, 3e38]], np.float32), np.array([[5, -1]]))], 2, "l2")
    assert ids.tolist() == [[5, -1]]


def _flat_shards(xb, n_shards, tmp_path) -> list[list]:
    """``n_shards`` saved Flat shard actors over contiguous id ranges of ``xb``."""
    shards = []
    for s, part in enumerate(np.array_split(np.arange(len(xb)), n_shards)):
        actor = shard_actor(name=None, num_cpus=0.5, dim=D, factory="Flat", metric="ip",
                            uri=str(tmp_path / f"s{s}.faiss"))
        ray.get(actor.add.remote(part, xb[part]))
        ray.get(actor.save.remote())
        shards.append([actor])
    return shards


def test_sharded_search_equals_one_index(ray_local, tmp_path):
    xb, xq = _data()
    _, exact = _exact(xb, xq, 10)
    shards = _flat_shards(xb, 3, tmp_path)
    router = ShardedIndex(shards, "ip")
    assert router.ntotal() == len(xb)
    _, ids = router.search(xq, 10)
    assert np.array_equal(ids, exact)
    _, few = router.search(xq[:3], 1500)  # k above one shard's 1000 vectors: the others fill in
    assert (few >= 0).all()
    _, many = router.search(xq[:3], 3100)
    assert (many[:, 3000:] == -1).all() and sorted(many[0, :3000]) == list(range(3000))
    for replicas in shards:
        ray.kill(replicas[0])


@pytest.mark.parametrize("factory, min_recall", [("IVF16,Flat", 1.0), ("IVF16,PQ16", 0.8)])
def test_trained_ivf_shard_against_brute_force(tmp_path, factory, min_recall):
    xb, xq = _data(n=4000)
    shard = IndexShard(dim=D, factory=factory, metric="ip", uri=str(tmp_path / "s.faiss"), nprobe=16)
    shard.train(xb)
    shard.add(np.arange(len(xb)) + 1000, xb)  # ids are ours, not positions
    _, ids = shard.search(xq, 10)
    _, exact = _exact(xb, xq, 10)
    assert index.recall_at_k(ids, exact + 1000) >= min_recall  # nprobe = nlist: IVF-Flat is exact
    shard.save()
    reloaded = IndexShard(dim=D, factory="unused: loaded from file", metric="ip", uri=str(tmp_path / "s.faiss"))
    assert reloaded.ntotal() == 4000


def test_killed_shard_restarts_from_its_file_and_answers_every_query(ray_local, tmp_path):
    xb, xq = _data()
    _, exact = _exact(xb, xq, 5)
    shards = _flat_shards(xb, 2, tmp_path)
    router = ShardedIndex(shards, "ip")
    refs = [shards[0][0].search.remote(xq, 5) for _ in range(20)]
    ray.kill(shards[0][0], no_restart=False)  # crash while queries are queued
    for _ in range(5):
        assert np.array_equal(router.search(xq, 5)[1], exact)
    part0 = set(np.array_split(np.arange(len(xb)), 2)[0].tolist())
    for ref in refs:  # calls in flight at the kill were retried on the restarted shard
        ids = ray.get(ref)[1]
        assert set(ids[ids >= 0].ravel().tolist()) <= part0
    assert ray.get(shards[0][0].ntotal.remote()) == len(part0)
    for replicas in shards:
        ray.kill(replicas[0], no_restart=True)


def test_s3_save_and_load(s3_endpoint):
    xb, xq = _data(n=500)
    storage_cfg = StorageConfig(s3_endpoint=s3_endpoint)
    shard = IndexShard(dim=D, factory="HNSW16", metric="ip", uri="s3://retro/index/shard-0000.faiss",
                       storage_cfg=storage_cfg)
    shard.add(np.arange(500), xb)
    shard.save()
    loaded = IndexShard(dim=D, factory="HNSW16", metric="ip", uri="s3://retro/index/shard-0000.faiss",
                        storage_cfg=storage_cfg)
    assert np.array_equal(loaded.search(xq, 5)[1], shard.search(xq, 5)[1])
    assert Storage(storage_cfg).exists("s3://retro/index/shard-0000.faiss")


def test_uniform_sample_covers_the_whole_range():
    ids = index.uniform_sample(100_000, 2_000, seed=0)
    assert len(np.unique(ids)) == 2_000 and (np.diff(ids) > 0).all()
    assert ids[0] < 1_000 and ids[-1] > 99_000 and 40_000 < np.median(ids) < 60_000


def test_assign_blocks_gives_contiguous_ranges():
    blocks = [f"b{i}" for i in range(7)]
    assert index.assign_blocks(blocks, 3) == [["b0", "b1", "b2"], ["b3", "b4"], ["b5", "b6"]]
    assert index.assign_blocks(blocks[:1], 2) == [["b0"], []]


def test_training_sample_too_small_is_a_clear_error(built_db):
    cfg, _ = built_db
    small = cfg.model_copy(update={"index": cfg.index.model_copy(update={"factory": "IVF1024,Flat"})})
    with pytest.raises(TrainingSampleError, match=r"IVF1024,Flat.*at least 1024 training vectors.*has \d+"):
        index.run(small, Storage(), force=True)


def test_index_stage_resumes_only_unfinished_shards(built_db, tmp_path):
    cfg, _ = built_db
    cfg = cfg.model_copy(update={"workdir": str(tmp_path), "index": cfg.index.model_copy(update={"shards": 2})})
    storage = Storage()
    for stage in ("tokenizer", "db"):  # reuse the built database under a new run directory
        storage.upload_dir(f"{built_db[0].workdir}/{stage}", f"{tmp_path}/{stage}")
    first = index.run(cfg, storage)
    manifest_file = tmp_path / "index" / "_manifest.json"
    state = json.loads(manifest_file.read_text())
    del state["blocks"]["shard-0001"]  # as if killed before shard 1 was recorded
    state["complete"] = False
    manifest_file.write_text(json.dumps(state))
    kept = (tmp_path / "index" / "shard-0000.faiss").stat().st_mtime_ns
    resumed = index.run(cfg, storage)
    assert resumed.complete and resumed.counts["vectors"] == first.counts["vectors"]
    assert (tmp_path / "index" / "shard-0000.faiss").stat().st_mtime_ns == kept
    assert resumed.blocks["shard-0001"] == first.blocks["shard-0001"]


# The paper's family (OPQ64_128,IVF4194304_HNSW32,PQ64) at small scale: the router's coarse
# quantizer sits behind the OPQ rotation, and shards scan the lists it picks in rotated space.
@pytest.mark.parametrize("factory, d, n, nprobe", [("IVF32,Flat", D, 4000, 4),
                                                   pytest.param("OPQ16_64,IVF256_HNSW32,PQ16", 64, 10_000, 16,
                                                                marks=pytest.mark.slow)])
def test_ivf_router_assigns_lists_once_and_equals_one_index(ray_local, tmp_path, factory, d, n, nprobe):
    from index_actors.shard import coarse_quantizer, load_index, new_index, save_index

    xb, xq = _data(n=n, d=d)
    template = new_index(d, factory, "ip")
    template.train(xb)
    save_index(Storage(), str(tmp_path / "trained.faiss"), template)
    whole = IndexShard(dim=d, factory=factory, metric="ip", uri=str(tmp_path / "whole.faiss"),
                       template_uri=str(tmp_path / "trained.faiss"), nprobe=nprobe)
    whole.add(np.arange(len(xb)), xb)
    shards = []
    for s, part in enumerate(np.array_split(np.arange(len(xb)), 2)):
        actor = shard_actor(name=None, num_cpus=0.5, dim=d, factory=factory, metric="ip", nprobe=nprobe,
                            uri=str(tmp_path / f"s{s}.faiss"), template_uri=str(tmp_path / "trained.faiss"))
        ray.get(actor.add.remote(part, xb[part]))
        shards.append([actor])
    router = ShardedIndex(shards, "ip", quantizer=coarse_quantizer(template), nprobe=nprobe,
                          sub_batch=len(xq) // 3 + 1)  # sub-batches assigned while the shards scan others
    dist, ids = router.search(xq, 10)
    exp_dist, exp_ids = whole.search(xq, 10)
    # the quantizer of an index nothing else holds (the router's case: one loaded from its file)
    assert coarse_quantizer(load_index(Storage(), str(tmp_path / "trained.faiss"))) == coarse_quantizer(template)
    np.testing.assert_allclose(dist, exp_dist, rtol=1e-5)
    assert (ids == exp_ids).mean() > 0.99  # equal up to ties
    assert index.recall_at_k(ids, _exact(xb, xq, 10)[1]) < 1.0  # nprobe 4 of 32: approximate, as one index
    router.close()
