"""Shared fixtures: one local Ray instance, a real S3 API (moto server), tiny real data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

# Fake credentials for the moto server, set before Ray starts so its workers inherit them.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process the suite starts inherits this mark (Ray's daemons and workers too): what still
# carries it when the suite ends has outlived it.
SUITE_MARK, SUITE_ID = "RETRO_RAY_TEST_SUITE", str(os.getpid())
os.environ[SUITE_MARK] = SUITE_ID

from retro_ray.core.config import Config, CorpusSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
WIKI = SHARED / "wiki" / "part-003.parquet"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the tests marked slow: the cluster drill, the main job, the benchmark smoke runs")


def pytest_report_header(config):
    return "suite: " + ("full" if config.getoption("--full") else "fast (tests marked slow left out: --full runs them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if not item.get_closest_marker("slow")]


def _outliving(wait_s: float) -> list[psutil.Process]:
    """The processes this suite started that are still alive after up to ``wait_s`` seconds."""
    deadline = time.time() + wait_s
    while True:
        alive = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and \
                        proc.environ().get(SUITE_MARK) == SUITE_ID:
                    alive.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(1)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process the suite started (a Ray daemon, worker or actor, a server)
    outlives it: named, then killed."""
    leftover = _outliving(wait_s=30)
    if not leftover:
        return
    names = []
    for proc in leftover:
        try:
            names.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.Error:
            pass
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    terminal.ensure_newline()
    terminal.write_line(
        f"FAILED: {len(names)} processes started by the suite outlived it (killed now):\n  " + "\n  ".join(names),
        red=True, bold=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()
"""Where the session's Ray node serves its Prometheus metrics."""


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with a bucket ``retro``; stopped after the session."""
    import boto3

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        try:
            client.create_bucket(Bucket="retro")
            break
        except Exception:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def wiki_docs() -> list[dict]:
    """Twelve real Wikipedia articles, cut to about 1,200 characters each."""
    table = pq.read_table(WIKI, columns=["title", "text"]).slice(0, 12)
    return [{"title": r["title"], "text": r["text"][:1200]} for r in table.to_pylist()]


@pytest.fixture(scope="session")
def wiki_parquet(tmp_path_factory, wiki_docs) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "wiki.parquet"
    pq.write_table(pa.Table.from_pylist(wiki_docs), path)
    return path


@pytest.fixture(scope="session")
def bad_jsonl(tmp_path_factory, wiki_docs) -> Path:
    """Three good documents around one of each kind of bad row (lines 2-6)."""
    lines = [
        json.dumps({"text": wiki_docs[0]["text"]}).encode(),
        b'{"text": "unterminated',                  # 2 malformed_json
        json.dumps({"body": "no text field"}).encode(),  # 3 missing_text_field
        b'{"text": "caf\xe9 latin-1"}',              # 4 non_utf8
        json.dumps({"text": "   "}).encode(),       # 5 empty
        b"",                                        # 6 empty line
        json.dumps({"text": wiki_docs[1]["text"]}).encode(),
        json.dumps({"text": wiki_docs[2]["text"]}).encode(),
    ]
    path = tmp_path_factory.mktemp("bad") / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def tiny_config(workdir, *paths, **sections) -> Config:
    """A config small enough for tests: tiny BPE, small blocks, one single-thread embed actor."""
    data = {
        "workdir": str(workdir),
        "corpus": {"sources": [CorpusSource(name="wiki", paths=[str(p) for p in paths]).model_dump()]},
        "tokenizer": {"vocab_size": 512},
        "db": {"block_size": 16},
        "embed": {"batch_size": 8, "max_actors": 1, "max_length": 128},
        "model": {"d_model": 32, "n_layers": 4, "n_heads": 4, "encoder_layers": 1, "cca_layers": [2, 4]},
        "train": {"micro_batch_size": 2, "max_steps": 4, "checkpoint_every": 4, "eval_every": 4, "eval_batches": 2,
                  "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.update({key: value})
    return Config.model_validate(data)


def bench(script: str, *args: str, timeout: int = 900) -> tuple[list[str], dict]:
    """Run ``bench/{script}`` as a user would (its own Ray, if any): its output lines, and the
    JSON object of its last line."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-4000:]
    return lines, json.loads(lines[-1])


def kill_stage(cfg: Config, folder: Path, stage: str, out: str, done, timeout_s: float = 300) -> dict:
    """Run ``retro-ray {stage}`` on ``cfg`` in a subprocess (its own Ray), SIGKILL it as soon as
    ``done(blocks)`` holds for the blocks its manifest in ``out`` records, and return that manifest."""
    import signal

    from retro_ray.core.manifest import MANIFEST, Manifest

    from retro_ray.core.storage import Storage

    config_file = folder / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "retro_ray.cli", stage, "--config", str(config_file)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if (Path(out) / MANIFEST).exists() and done(Manifest.load(Storage(), out).blocks):
                break
            assert proc.poll() is None, f"{stage} ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return Manifest.load(Storage(), out).model_dump()


def kill_db_at_first_embedding(cfg: Config, folder: Path, timeout_s: float = 300) -> dict:
    """The db stage's manifest once it has recorded its first embedded block (see ``kill_stage``)."""
    return kill_stage(cfg, folder, "db", str(Path(cfg.workdir) / "db"),
                      lambda blocks: any("embeddings_sha256" in b for b in blocks.values()), timeout_s)


def reference_samples(cfg: Config, out: Path, searcher=None) -> dict[str, str]:
    """The neighbours stage as one process ran it before it was distributed: every sample of a
    split laid out in memory, then its blocks queried one at a time (through the index stage's
    router, or ``searcher``); block name -> SHA-256 of the file it writes under ``out``."""
    import numpy as np

    from retro_ray.retrieval import index, neighbors

    from retro_ray.core.layout import db_dir
    from retro_ray.core.storage import Storage
    from retro_ray.database import tokenizer
    from retro_ray.database.files import ChunkStore, finished_db, read_vectors

    storage, nc, m = Storage(), cfg.neighbors, cfg.db.chunk_length
    db_manifest = finished_db(cfg, storage)
    blocks = sorted(db_manifest.blocks)
    store = ChunkStore.open(storage, db_dir(cfg), blocks)
    eod = tokenizer.load_run_tokenizer(cfg, storage).convert_tokens_to_ids(cfg.tokenizer.eod_token)
    valid = np.array([neighbors.is_valid_doc(d, nc.valid_fraction) for d in range(db_manifest.counts["docs"])])
    router, shas = searcher or index.open_router(cfg, storage), {}
    for split, in_split in (("train", ~valid), ("valid", valid)):
        ids, docs, lengths = [], [], []
        for b in range(len(blocks)):
            start, block_docs, block_lengths = store.block(b)
            for i in np.flatnonzero(in_split[block_docs]):
                c, n = start + int(i), int(block_lengths[i])
                ids.append(c)
                docs.append(int(block_docs[i]))
                last = store.is_last_of_doc(c)
                lengths.append(n + 1 if last and n < m else n)
                if last and n == m:  # EOD opens a chunk of its own
                    ids.append(-1)
                    docs.append(int(block_docs[i]))
                    lengths.append(1)
        pad = -len(ids) % (nc.seq_len // m)
        layout = neighbors.SampleLayout(*(np.array(a + [fill] * pad, dtype).reshape(-1, nc.seq_len // m) for a, fill, dtype
                                    in ((ids, -1, np.int64), (docs, -1, np.int64), (lengths, 0, np.int32))))
        for first in range(0, len(layout.chunk_ids), nc.samples_per_block):
            sl = slice(first, min(first + nc.samples_per_block, len(layout.chunk_ids)))
            chunk_ids = layout.chunk_ids[sl]
            real = chunk_ids >= 0
            candidates = np.full((*chunk_ids.shape, nc.k_candidates), -1, dtype=np.int64)
            candidates[real] = router.search(read_vectors(storage, db_dir(cfg), blocks, chunk_ids[real]),
                                             nc.k_candidates)[1]
            if nc.max_overlap is not None:
                candidates, _ = neighbors.drop_near_copies(store, chunk_ids, candidates, 2 * m, nc.max_overlap)
            near = neighbors.filter_neighbors(candidates, store.doc_ids_of(candidates), layout.doc_ids[sl], nc.k)
            table = neighbors._block_table(sl.start, neighbors.sample_tokens(store, chunk_ids, m, eod), layout, sl, near)
            name = f"{split}/{sl.start:010d}-{sl.stop:010d}"
            shas[name] = storage.write_parquet(str(out / f"{name}.parquet"), table)
    router.close()
    return shas


@pytest.fixture(scope="session")
def built_db(ray_local, tmp_path_factory, wiki_parquet):
    """Tokenizer and chunk database of ``wiki_parquet``: (config, db manifest)."""
    from retro_ray.core.storage import Storage
    from retro_ray.database import chunks, tokenizer

    cfg = tiny_config(tmp_path_factory.mktemp("built"), wiki_parquet)
    tokenizer.run(cfg, Storage())
    return cfg, chunks.run(cfg, Storage())


# -- a tiny run to generate with, and models for it ---------------------------------------------

M = 64
LOGITS_ATOL = {"cpu": 1e-4, "cuda": 5e-2}
"""How close a cached pass's logits must be to the full recomputation's, on each device's dtype
(fp32 on the CPU, bf16 on CUDA); the greedy tokens must be equal on both."""
PROMPT = ("The Battle of Hastings was fought on 14 October 1066 between the Norman-French army of "
          "William, the Duke of Normandy, and an English army under the Anglo-Saxon King Harold Godwinson.")


def read_split(cfg: Config, split: str) -> pa.Table:
    """Every sample of a split of the neighbours stage, in order, as one table (tiny runs only:
    the stage's readers go a block at a time, ``RetroSamples``)."""
    from retro_ray.core.storage import Storage
    from retro_ray.retrieval.neighbors import split_blocks

    return pa.concat_tables([Storage().read_parquet(uri) for uri, _ in split_blocks(Storage(), cfg, split)])


def copy_database(cfg: Config, workdir: Path) -> None:
    """The tokenizer and database of ``cfg``'s run (``built_db``, which other tests also index and
    sample with their own settings) into a run directory of its own."""
    import shutil

    for folder in ("tokenizer", "db"):
        shutil.copytree(Path(cfg.workdir) / folder, Path(workdir) / folder, ignore=shutil.ignore_patterns("_locks"))


def generation_run(built_db, folder, neighbors_stage: bool = True) -> Config:
    """A copy of the tiny database with an exact 2-shard index (and the neighbours stage)."""
    from retro_ray.core.storage import Storage
    from retro_ray.retrieval import index, neighbors

    cfg, _ = built_db
    workdir = Path(folder) / "run"
    copy_database(cfg, workdir)
    cfg = cfg.model_copy(update={
        "workdir": str(workdir),
        "index": cfg.index.model_copy(update={"factory": "Flat", "shards": 2}),
        "neighbors": cfg.neighbors.model_copy(update={"seq_len": 256, "k_candidates": 8, "valid_fraction": 0.25}),
    })
    index.run(cfg, Storage())
    if neighbors_stage:
        neighbors.run(cfg, Storage())
    return cfg


def _trained_looking(cca_modules) -> None:
    """Non-zero CCA outputs (weights and bias), so retrieval changes the logits."""
    with torch.no_grad():
        for cca in cca_modules:
            torch.nn.init.normal_(cca.attn.out.weight, std=0.3)
            torch.nn.init.normal_(cca.attn.out.bias, std=0.1)


def make_model(kind: str, vocab: int, eos: int):
    """A tiny random model of ``kind`` (retro, gpt, llama, qwen2, qwen3, mistral, gemma3, gpt2) whose
    CCA changes its output and which never ends a text by itself. The Mistral's layers attend within a
    sliding window of 40 positions, the Gemma 3's first and third."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    from retro_ray.model import Retro, RetroConfig
    from retro_ray.model.retrofit import RetroFit, retrofit_config

    torch.manual_seed(0)
    common = dict(chunk_length=M, k=2, encoder_layers=1, cca_layers=[2, 4])
    if kind in ("retro", "gpt"):
        model = Retro(RetroConfig(vocab_size=vocab, d_model=32, n_layers=4, n_heads=4, max_seq_len=512,
                                  retrieval=kind == "retro", **common))
        _trained_looking([b.cca for b in model.blocks if b.cca is not None])
        with torch.no_grad():  # end of text never the likeliest token: every run decodes its full length
            model.wte.weight[eos] = 0.0  # tied with the output: it scores 0
        return model.eval()
    decoder = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=512)
    if kind == "llama":
        base = LlamaForCausalLM(LlamaConfig(**decoder))
    elif kind == "qwen2":
        base = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif kind == "qwen3":
        base = Qwen3ForCausalLM(Qwen3Config(**decoder, head_dim=8))
    elif kind == "mistral":
        base = MistralForCausalLM(MistralConfig(**decoder, sliding_window=40))
    elif kind == "gemma3":
        base = Gemma3ForCausalLM(Gemma3TextConfig(**decoder, head_dim=8, query_pre_attn_scalar=8, sliding_window=40,
                                                  layer_types=["sliding_attention", "full_attention"] * 2))
    else:
        base = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=512))
    model = RetroFit(base, retrofit_config(base, **common))
    _trained_looking(model.cca.values())
    with torch.no_grad():
        base.get_output_embeddings().weight[eos] = 0.0
        if base.get_output_embeddings().bias is not None:
            base.get_output_embeddings().bias[eos] = -10.0
    return model.eval()


