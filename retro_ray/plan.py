"""``retro-ray plan``: what a database, its index, the neighbour stage and training will take,
before any of it starts: chunks, embedding GPU-hours, index RAM and shards, nodes per stage.

Every figure is a count times a per-unit cost. The per-unit costs, and where each comes from:

- FLOPs of an encoder or decoder: 2 x parameters x tokens forward, 6 x for training, plus
  attention (the usual transformer arithmetic).
- GPU speed: the vendor's dense bf16 peak (``GPUS``) at an assumed utilisation (``EMBED_MFU``,
  ``TRAIN_MFU``); no GPU was lent to measure one. The paper's 6.22M BERT-large chunks per
  A100-hour is 24% of the A100's peak.
- CPU speed (``CPU_GFLOPS_PER_CORE``) and the scan rates of a query: measured on the development
  machine (2 cores, 2026-11): all-MiniLM-L6-v2 embedded 117 chunks/s (``bench/embed.py``);
  IVF256,PQ64 with one thread scanned 0.7-0.9 GB of codes/s (``PQ_BYTES_PER_CORE_S``); HNSW32
  over 384-dim vectors at efSearch 64 computed 1.6 x efSearch x M distances a query, 6.6 GB of
  vectors/s (``HNSW_BYTES_PER_CORE_S``).
- Encoder tokens per chunk (``ENCODER_TOKENS_PER_TOKEN``): 64 SmolLM2 tokens of the pydocs corpus
  are 72.0 BERT wordpiece tokens with [CLS] and [SEP].
- Index bytes per vector: the codes and ids the factory string stores (``index_bytes``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel

from retro_ray.core.config import QUICKSTART, Config
from retro_ray.core.errors import UserError

QUICKSTART_CLUSTER = QUICKSTART.parents[1] / "cluster" / "aws.yaml"
"""The cluster the plan sizes by default: this project's AWS launcher YAML."""

GPUS = {"A100": (312e12, 80), "H100": (989e12, 80), "H200": (989e12, 141), "A10G": (70e12, 24),
        "L4": (121e12, 24), "L40S": (362e12, 48), "V100": (125e12, 32), "T4": (65e12, 16)}
"""Dense bf16 (fp16 for V100 and T4) peak FLOP/s and memory GiB, from the vendors' datasheets."""

INSTANCES = {  # cloud instance type: (GPU, GPUs, CPUs, memory GiB)
    "p4d.24xlarge": ("A100", 8, 96, 1152), "p4de.24xlarge": ("A100", 8, 96, 1152),
    "p5.48xlarge": ("H100", 8, 192, 2048), "p5e.48xlarge": ("H200", 8, 192, 2048),
    "g5.xlarge": ("A10G", 1, 4, 16), "g5.2xlarge": ("A10G", 1, 8, 32), "g5.12xlarge": ("A10G", 4, 48, 192),
    "g5.48xlarge": ("A10G", 8, 192, 768), "g6.xlarge": ("L4", 1, 4, 16), "g6e.xlarge": ("L40S", 1, 4, 32),
    "m6i.2xlarge": (None, 0, 8, 32), "m6i.4xlarge": (None, 0, 16, 64), "m6i.8xlarge": (None, 0, 32, 128),
    "r6i.8xlarge": (None, 0, 32, 256), "r6i.16xlarge": (None, 0, 64, 512), "r6i.32xlarge": (None, 0, 128, 1024),
    "x2idn.32xlarge": (None, 0, 128, 2048), "x2iedn.32xlarge": (None, 0, 128, 4096),
}

ENCODERS = {"bert-large": (24, 1024, 4096), "bert-base": (12, 768, 3072), "all-MiniLM-L6-v2": (6, 384, 1536)}
"""Encoder shapes by name: (layers, hidden size, feed-forward size)."""

EMBED_MFU = 0.3
TRAIN_MFU = 0.4
CPU_GFLOPS_PER_CORE = 96.0
PQ_BYTES_PER_CORE_S = 0.8e9
HNSW_BYTES_PER_CORE_S = 6.6e9
ENCODER_TOKENS_PER_TOKEN = 72.0 / 64
INDEX_RAM_USABLE = 0.7  # of a node's memory, for shards (the rest: OS, Ray, query buffers)
TRAIN_BYTES_PER_PARAM = 16  # bf16 weights and grads, fp32 master weights and Adam moments (ZeRO)

PAPER_INPUTS = {"tokens": 1.2e12, "embedder": "bert-large", "factory": "OPQ64_128,IVF4194304_HNSW32,PQ64",
                "embed_node": "train_gpu", "model_params": 43e9, "train_tokens": 100e9}
"""InstructRetro's inputs: its corpus, encoder and index; embedding on A100s (the p4d node type of
``cluster/aws.yaml``); the 43B Retro continued on 100B tokens."""

PAPER = {"chunks": 19e9, "embed_gpu_hours": 19e9 / 6.22e6, "index_ram_gb": 1000.0}
"""InstructRetro's database: 19B chunks of 1.2T tokens; BERT-large at 6.22M chunks per A100-hour
(about 3,000 A100-hours); an OPQ64_128,IVF4194304_HNSW32,PQ64 index in about 1 TB of RAM."""


@dataclass
class NodeType:
    name: str
    gpu: str | None
    gpus: int
    cpus: int
    memory_gb: float
    labels: dict


def node_types(cluster_yaml: str | Path) -> dict[str, NodeType]:
    """The node types of a Ray cluster launcher YAML: from each one's instance type, with the
    ``resources`` it declares (CPU, GPU, memory in bytes) taking precedence."""
    data = yaml.safe_load(Path(cluster_yaml).read_text())
    out = {}
    for name, spec in (data.get("available_node_types") or {}).items():
        resources = dict(spec.get("resources") or {})
        instance = (spec.get("node_config") or {}).get("InstanceType")
        gpu, gpus, cpus, mem = INSTANCES.get(instance, (None, 0, 0, 0))
        if instance and instance not in INSTANCES and not {"CPU", "memory"} <= resources.keys():
            raise UserError(f"{cluster_yaml}: node type {name!r}: instance type {instance!r} is not in "
                            f"retro_ray.plan.INSTANCES; give its resources (CPU, GPU, memory) in the YAML")
        out[name] = NodeType(name, gpu if resources.get("GPU", gpus) else None, int(resources.get("GPU", gpus)),
                             int(resources.get("CPU", cpus)), resources.get("memory", mem * 2**30) / 1e9,
                             {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")})
    return out


def pick_node(types: dict[str, NodeType], stage: str, labels: dict, name: str | None) -> NodeType:
    """The node type named, else the one carrying the stage's labels (``resources.{stage}``, else
    the ``node_{stage}`` label of this project's cluster files), else the likeliest: the most
    GPUs for embedding and training, the most memory without GPUs for the index."""
    if name:
        if name not in types:
            raise UserError(f"no node type {name!r} in the cluster YAML (has: {', '.join(types)})")
        return types[name]
    for wanted in (labels, {f"node_{stage}": 1}):
        carrying = [t for t in types.values() if wanted and wanted.keys() <= t.labels.keys()]
        if carrying:
            return carrying[0]
    if stage == "index":
        return max(types.values(), key=lambda t: (t.gpus == 0, t.memory_gb))
    return max(types.values(), key=lambda t: (t.gpus, t.memory_gb))


def encoder_shape(embedder: str) -> tuple[int, int, int]:
    """(layers, hidden, feed-forward) of a named encoder or a Hugging Face folder's config.json."""
    if embedder in ENCODERS:
        return ENCODERS[embedder]
    config = Path(embedder) / "config.json"
    if not config.exists():
        raise UserError(f"embedder {embedder!r}: not one of {', '.join(ENCODERS)} and no {config}")
    c = json.loads(config.read_text())
    return c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]


def forward_flops(layers: int, d: int, ff: int, tokens: float) -> float:
    """FLOPs of one forward pass over a sequence of ``tokens`` (matmuls and attention)."""
    per_token = 2 * layers * (4 * d * d + 2 * d * ff) + 4 * layers * tokens * d
    return per_token * tokens


def index_bytes(factory: str, dim: int) -> tuple[float, float, dict]:
    """(bytes per vector, fixed bytes, parsed parts) of a Faiss index built by ``factory``."""
    d, per_vector, fixed, parts = dim, 0.0, 0.0, {}
    ivf = False
    for part in factory.split(","):
        if m := re.fullmatch(r"OPQ(\d+)(?:_(\d+))?", part):
            d_out = int(m.group(2) or d)
            fixed += 4 * d * d_out
            d = d_out
        elif m := re.fullmatch(r"PCAR?(\d+)", part):
            fixed += 4 * d * int(m.group(1))
            d = int(m.group(1))
        elif m := re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", part):
            nlist, links = int(m.group(1)), int(m.group(2) or 0)
            fixed += nlist * (4 * d + 2 * links * 4)
            parts.update(nlist=nlist, dim=d)
            ivf = True
        elif m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?", part):
            per_vector += int(m.group(1)) * int(m.group(2) or 8) / 8
            parts["code_bytes"] = per_vector
        elif m := re.fullmatch(r"HNSW(\d+)", part):
            per_vector += 4 * d + 2 * int(m.group(1)) * 4
            parts.update(hnsw=int(m.group(1)), dim=d)
        elif part == "Flat":
            per_vector += 4 * d
        elif part == "SQ8":
            per_vector += d
        elif part == "SQfp16":
            per_vector += 2 * d
        else:
            raise UserError(f"index factory {factory!r}: cannot size the part {part!r}")
    if not ivf and per_vector == 0:
        raise UserError(f"index factory {factory!r}: no storage part (Flat, PQ, SQ, HNSW)")
    return per_vector + 8, fixed, parts  # + 8: the int64 id of every vector


class Plan(BaseModel):
    tokens: float
    chunks: float
    embed_node: str
    embed_flops_per_chunk: float
    embed_chunks_per_hour: float
    """Per GPU of the embedding node type (per CPU core when it has none)."""
    embed_hours: float
    """GPU-hours (core-hours on a CPU node type)."""
    embed_unit: str
    index_node: str
    index_ram_gb: float
    shards: int
    index_nodes: int
    shard_ram_gb: float
    query_core_s: float
    neighbor_queries: float
    neighbor_hours: float
    """Wall-clock hours on the index nodes, every core searching."""
    train_node: str
    train_params: float
    train_tokens: float
    train_gpu_hours: float
    train_nodes: int
    train_days: float


def query_seconds(parts: dict, per_vector: float, n: float, nprobe: int, ef_search: int) -> float:
    """Core-seconds of one neighbour query of an index of ``n`` vectors (``index_bytes``'s parts)."""
    if "nlist" in parts and "code_bytes" in parts:  # IVF-PQ: scan nprobe lists of codes
        return nprobe * n / parts["nlist"] * parts["code_bytes"] / PQ_BYTES_PER_CORE_S
    if "hnsw" in parts:  # a graph walk: about 1.6 x efSearch x M distances to full vectors
        return 1.6 * ef_search * parts["hnsw"] * 4 * parts["dim"] / HNSW_BYTES_PER_CORE_S
    return n * (per_vector - 8) / PQ_BYTES_PER_CORE_S  # exhaustive over the codes


def make_plan(cfg: Config, types: dict[str, NodeType], tokens: float, *, embedder: str, factory: str,
              nprobe: int, model_params: float, train_tokens: float, days: float,
              chunks_per_token: float | None = None, embed_node: str | None = None,
              index_node: str | None = None, train_node: str | None = None) -> Plan:
    m = cfg.db.chunk_length
    chunks = tokens * (chunks_per_token or 1 / m)
    layers, d, ff = encoder_shape(embedder)
    flops = forward_flops(layers, d, ff, m * ENCODER_TOKENS_PER_TOKEN)
    embed = pick_node(types, "embed", cfg.resources.embed, embed_node)
    if embed.gpus:
        rate, unit = GPUS[embed.gpu][0] * EMBED_MFU / flops * 3600, f"{embed.gpu}-hours"
    else:
        rate, unit = CPU_GFLOPS_PER_CORE * 1e9 / flops * 3600, "CPU core-hours"

    per_vector, fixed, parts = index_bytes(factory, d)  # mean pooling: vectors of the hidden size
    ram = (chunks * per_vector + fixed) / 1e9
    index = pick_node(types, "index", cfg.resources.index, index_node)
    nodes = max(1, math.ceil(ram / (index.memory_gb * INDEX_RAM_USABLE)))
    shards = max(cfg.index.shards, nodes)
    query_s = query_seconds(parts, per_vector, chunks, nprobe, cfg.index.ef_search)
    queries = train_tokens / m

    train = pick_node(types, "train", cfg.resources.train, train_node)
    if not train.gpus:
        raise UserError(f"node type {train.name!r} has no GPUs to train on: name another with --train-node")
    peak, memory = GPUS[train.gpu]
    gpu_hours = 6 * model_params * train_tokens / (peak * TRAIN_MFU) / 3600
    min_gpus = math.ceil(TRAIN_BYTES_PER_PARAM * model_params / (memory * 2**30 * 0.8))
    train_nodes = max(math.ceil(min_gpus / train.gpus), math.ceil(gpu_hours / (24 * days) / train.gpus))
    return Plan(tokens=tokens, chunks=chunks, embed_node=embed.name, embed_flops_per_chunk=flops,
                embed_chunks_per_hour=rate, embed_hours=chunks / rate, embed_unit=unit, index_node=index.name,
                index_ram_gb=ram, shards=shards, index_nodes=nodes, shard_ram_gb=ram / shards, query_core_s=query_s,
                neighbor_queries=queries, neighbor_hours=queries * query_s / 3600 / (index.cpus * nodes),
                train_node=train.name, train_params=model_params, train_tokens=train_tokens,
                train_gpu_hours=gpu_hours, train_nodes=train_nodes, train_days=days)


def vs_paper(plan: Plan) -> dict[str, float]:
    """Each plan figure over the paper's (1.0: equal)."""
    return {"chunks": plan.chunks / PAPER["chunks"], "embed_gpu_hours": plan.embed_hours / PAPER["embed_gpu_hours"],
            "index_ram_gb": plan.index_ram_gb / PAPER["index_ram_gb"]}


def sample_corpus(cfg: Config, docs: int) -> tuple[float, float]:
    """(tokens, chunks per token) of the config's corpus, from its first ``docs`` documents per
    corpus tokenised with the run's tokenizer, scaled to all its files by bytes."""
    from retro_ray.core.storage import Storage
    from retro_ray.database import corpus, tokenizer

    storage = Storage(cfg.storage)
    tokenizer.finished_tokenizer(cfg, storage)  # a clear error when the run has none yet
    tok = tokenizer.load_run_tokenizer(cfg, storage)
    files = corpus.source_files(cfg, storage)
    total_tokens = total_chunks = 0.0
    for source in cfg.corpus.sources:
        path = files[source.name][0]
        fs, fs_path = storage.resolve(path)
        fmt = corpus.detect_format(source, path)
        size = fs.get_file_info(fs_path).size
        texts, rows = [], 0
        with (fs.open_input_file if fmt == "parquet" else fs.open_input_stream)(fs_path) as f:
            for table in corpus.read_source_file(f, path, fmt, source, max_rows=docs):
                rows += table.num_rows
                texts += [t for t in table.column("text").to_pylist() if t]
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(fs_path) as f:
                sampled_bytes = size * rows / max(pq.ParquetFile(f).metadata.num_rows, 1)
        else:  # JSONL and text: the bytes of the rows read (their UTF-8 text, plus JSON framing)
            sampled_bytes = min(size, sum(len(t.encode()) for t in texts) * (1.05 if fmt == "jsonl" else 1.0))
        source_bytes = sum(fs.get_file_info(storage.resolve(p)[1]).size for p in files[source.name])
        scale = source_bytes / max(sampled_bytes, 1)
        total_tokens += sum(lengths) * scale
        total_chunks += sum(math.ceil(n / cfg.db.chunk_length) for n in lengths) * scale
    return total_tokens, total_chunks / max(total_tokens, 1)


def _n(x: float) -> str:
    """3 significant digits, thousands separated: 2,450 / 0.0123 / 1.88e+10."""
    return f"{x:.3g}" if x >= 1e6 or x < 1 else f"{float(f'{x:.3g}'):,g}"


def render(plan: Plan, paper: dict[str, float] | None = None) -> str:
    """The plan as the terminal table ``retro-ray plan`` prints."""
    rows = [
        ("corpus", f"{_n(plan.tokens)} tokens -> {_n(plan.chunks)} chunks"),
        ("embedding", f"{_n(plan.embed_hours)} {plan.embed_unit} on {plan.embed_node} "
                      f"({_n(plan.embed_chunks_per_hour)} chunks/hour each, "
                      f"{_n(plan.embed_flops_per_chunk / 1e9)} GFLOP a chunk)"),
        ("index RAM", f"{_n(plan.index_ram_gb)} GB: {plan.shards} shards of {_n(plan.shard_ram_gb)} GB "
                      f"on {plan.index_nodes} {plan.index_node} nodes"),
        ("neighbours", f"{_n(plan.neighbor_queries)} queries x {_n(plan.query_core_s * 1e3)} core-ms = "
                       f"{_n(plan.neighbor_hours)} hours on the index nodes"),
        ("training", f"{_n(plan.train_params)} params x {_n(plan.train_tokens)} tokens = "
                     f"{_n(plan.train_gpu_hours)} GPU-hours: {plan.train_nodes} {plan.train_node} nodes "
                     f"for {plan.train_days:g} days"),
    ]
    if paper:
        rows.append(("vs the paper", ", ".join(f"{k} {v:.2f}x" for k, v in paper.items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
