"""``retro-ray plan``: the paper's inputs give the paper's figures within 2x; the parts it sums
agree with real Faiss indexes and a real database."""

import json

import faiss
import numpy as np
import pytest

from retro_ray import plan
from retro_ray.cli import main


def test_the_plan_for_the_papers_inputs_is_within_2x_of_the_paper(capsys):
    assert main(["plan", "--paper", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["vs_paper"]) == {"chunks", "embed_gpu_hours", "index_ram_gb"}
    for figure, ratio in result["vs_paper"].items():
        assert 0.5 <= ratio <= 2.0, (figure, ratio)
    assert result["embed_unit"] == "A100-hours"
    index_node = plan.node_types(plan.QUICKSTART_CLUSTER)[result["index_node"]]
    assert result["shard_ram_gb"] <= index_node.memory_gb * plan.INDEX_RAM_USABLE  # every shard fits its node
    assert result["index_nodes"] * index_node.memory_gb * plan.INDEX_RAM_USABLE >= result["index_ram_gb"]


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "OPQ8_32,IVF16_HNSW8,PQ8", "HNSW16", "Flat"])
def test_index_bytes_match_a_real_faiss_index(factory):
    rng = np.random.default_rng(0)
    n, d = 20_000, 32
    xb = rng.standard_normal((n, d)).astype(np.float32)
    index = faiss.index_factory(d, factory)
    index.train(xb[:5000])
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap2(index)
    index.add_with_ids(xb, np.arange(n))
    actual = len(faiss.serialize_index(index))
    per_vector, fixed, _ = plan.index_bytes(factory, d)
    assert 0.8 <= (n * per_vector + fixed) / actual <= 1.25, (factory, n * per_vector + fixed, actual)


def test_a_sampled_corpus_is_sized_like_the_database_built_from_it(built_db):
    cfg, manifest = built_db
    tokens, chunks_per_token = plan.sample_corpus(cfg, docs=1000)
    assert tokens == pytest.approx(manifest.counts["tokens"], rel=0.01)
    assert tokens * chunks_per_token == pytest.approx(manifest.counts["chunks"], rel=0.01)


def test_unknown_factory_parts_and_node_types_are_named():
    with pytest.raises(plan.UserError, match="LSH"):
        plan.index_bytes("LSH", 64)
    types = plan.node_types(plan.QUICKSTART_CLUSTER)
    with pytest.raises(plan.UserError, match="gpu_nodes"):
        plan.pick_node(types, "embed", {}, "gpu_nodes")
