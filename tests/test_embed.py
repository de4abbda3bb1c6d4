import numpy as np
import pyarrow.parquet as pq

from conftest import tiny_config

from retro_ray.core.storage import Storage
from retro_ray.database.embed import Embedder
from retro_ray.database.files import read_embeddings


def test_actor_output_equals_a_direct_call(ray_local, tmp_path, wiki_parquet):
    from retro_ray.database import chunks, tokenizer

    cfg = tiny_config(tmp_path, wiki_parquet, corpus={"max_docs": 2})
    tokenizer.run(cfg, Storage())
    manifest = chunks.run(cfg, Storage())
    name = sorted(manifest.blocks)[-1]
    block = pq.read_table(tmp_path / "db" / "chunks" / f"{name}.parquet")
    texts, titles = block.column("text").to_pylist(), block.column("title").to_pylist()
    ids, vectors = read_embeddings(Storage(), str(tmp_path / "db" / "embeddings" / f"{name}.parquet"))
    embedder = Embedder(max_length=cfg.embed.max_length)
    direct = embedder.embed(texts, titles)[0]  # one batch, not the actor's batches of 8
    assert all(titles)  # each chunk is embedded with its document's title, as DPR embeds passages
    assert not np.allclose(embedder(texts).astype(np.float32), direct.astype(np.float32), atol=2e-3)
    assert vectors.dtype == np.float16 and vectors.shape == direct.shape == (len(texts), 384)
    np.testing.assert_allclose(vectors.astype(np.float32), direct.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_mean_pooling_ignores_padding():
    emb = Embedder(max_length=64)
    alone = emb(["retrieval augmented language models"])
    padded = emb(["retrieval augmented language models", "a much longer text " * 10])[:1]
    np.testing.assert_allclose(alone.astype(np.float32), padded.astype(np.float32), atol=2e-3)
