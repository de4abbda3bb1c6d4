"""Ray Train + DeepSpeed training loop (``retro-ray pretrain``), and GPT vs Retro (``compare``).

One ``train_loop_per_worker(config)`` in the style of Ray's DeepSpeed example: each worker reads
its share of the neighbour stage's samples, DeepSpeed owns the optimizer, ZeRO stage, gradient
accumulation and bf16 (on GPU; fp32 on CPU), and every ``checkpoint_every`` steps each rank saves
its DeepSpeed shard, rank 0 adds the consolidated weights (a Hugging Face style folder) and the
run state, and the checkpoint goes to ``ray.train.report``. A run started again with the same
``run_name`` resumes from ``ray.train.get_checkpoint()``: the DeepSpeed state when the world size
is unchanged, the consolidated weights (fresh optimizer state) when it changed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retro_ray.core.config import Config, TrainConfig, config_hash
from retro_ray.core.layout import (
    DB, MODEL_DIR, SAMPLES, TOKENIZER, checkpoints_dir, db_dir, eval_dir, model_dir,
    pretrained_runs, run_dir, run_folder, samples_dir,
)
from retro_ray.core.locks import locked
from retro_ray.core.manifest import Manifest, finished_stage, open_stage
from retro_ray.core.plots import png, subplots
from retro_ray.core.runtime import log, progress
from retro_ray.core.storage import Storage, join

STATE = "state.json"


def lr_at(step: int, warmup: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr`` at ``max_steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_model(cfg: Config, vocab_size: int, seq_len: int, tokenizer_id: str | None = None):
    """A fresh Retro (or GPT with ``train.retrieval: false``), or a retro-fitted base model.
    ``tokenizer_id`` (the tokenizer stage's fingerprint) is saved with the model, so generation
    can tell an index built with another tokenizer."""
    from retro_ray.model import Retro, RetroConfig
    from retro_ray.model.retrofit import RetroFit, load_causal_lm, retrofit_config

    mc = cfg.model
    common = dict(retrieval=cfg.train.retrieval, chunk_length=cfg.db.chunk_length, k=cfg.neighbors.k,
                  encoder_layers=mc.encoder_layers, encoder_d_model=mc.encoder_d_model,
                  cca_layers=mc.cca_layers, dropout=mc.dropout)
    if mc.base:
        base = load_causal_lm(mc.base)
        model = RetroFit(base, retrofit_config(base, **common))
    else:
        model = Retro(RetroConfig(vocab_size=vocab_size, d_model=mc.d_model, n_layers=mc.n_layers,
                                  n_heads=mc.n_heads, max_seq_len=seq_len, **common))
    if tokenizer_id:
        model.cfg.extra["tokenizer"] = tokenizer_id
    return model


def param_groups(model, tc: TrainConfig) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices and embeddings, none on biases and norm
    weights (1-D parameters), as Megatron's optimizer; the retrieval encoder and the CCA layers at
    ``train.retrieval_lr`` (else ``lr``). With ``train.trainable: retrieval`` nothing else trains:
    the other parameters stop requiring gradients and are in no group, so they stay bit-identical."""
    new = model.retrieval_parameters()
    frozen = tc.trainable == "retrieval"
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if frozen and name not in new:
            p.requires_grad_(False)
        if p.requires_grad:
            groups.setdefault((name in new, p.ndim > 1), []).append(p)
    return [{"params": params, "lr": tc.retrieval_lr if retrieval and tc.retrieval_lr else tc.lr,
             "weight_decay": tc.weight_decay if decayed else 0.0}
            for (retrieval, decayed), params in sorted(groups.items())]


def sample_batch(items: list[dict], chunk_len: int, retrieval: bool, device) -> dict[str, torch.Tensor]:
    """Samples -> model inputs: predict tokens[1:] from tokens[:-1]; padding is not a target."""
    tokens = torch.as_tensor(np.stack([it["tokens"] for it in items]))  # [b, n]
    lengths = torch.as_tensor(np.stack([it["chunk_lengths"] for it in items]))  # [b, l]
    real = torch.arange(chunk_len)[None, None, :] < lengths[..., None]  # [b, l, m]
    real = real.reshape(tokens.shape)  # [b, n]
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": real[:, 1:]}
    if retrieval:
        batch["neighbors"] = torch.as_tensor(np.stack([it["neighbors"] for it in items]))  # [b, l, k, r]
        batch["neighbor_mask"] = torch.as_tensor(np.stack([it["neighbor_mask"] for it in items]))
    return {k: v.to(device) for k, v in batch.items()}


def deepspeed_config(cfg: Config, world: int, gpu: bool, accum: int) -> dict:
    tc = cfg.train
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": tc.micro_batch_size * accum * world,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": gpu and torch.cuda.is_bf16_supported()},
        "steps_per_print": 10**9,  # we log ourselves
    }


def save_weights(engine, zero_stage: int, rank: int, folder: Path) -> None:
    """Rank 0 writes the full model as a Hugging Face style folder (every rank must call this:
    under ZeRO-3 the parameters are gathered first)."""
    import deepspeed

    from retro_ray.model.io import save_pretrained

    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                save_pretrained(engine.module, folder)
    elif rank == 0:
        save_pretrained(engine.module, folder)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; everything it needs is in ``config``: the run's config,
    its ``data`` (``SampleData``, or the tuning stage's rows) and for instruction tuning ``init``
    (the model folder to start from)."""
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from retro_ray.model.io import load_weights

    cfg = Config.model_validate(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"
    torch.manual_seed(tc.seed)
    storage = Storage(cfg.storage)
    data = config["data"](cfg, storage, device)
    train_data, valid_data, to_batch = data.train, data.valid, data.to_batch
    accum = grad_accum(cfg, data, world)
    if rank == 0 and accum > 1:
        log.info("train %s: %d micro-batches of %d rows a step on %d workers", tc.run_name, accum,
                 tc.micro_batch_size, world)
    model = _initial_model(cfg, storage, config.get("init"))

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    # One download of the checkpoint (from S3 too) serves both the weights and the engine state.
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as d:
        state = json.loads((Path(d) / STATE).read_text()) if d else None
        if state:
            start_step, history = state["step"], state["history"]
            if state["world_size"] != world:  # another world size: consolidated weights, fresh optimizer
                load_weights(model, Path(d) / MODEL_DIR)
        optimizer = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, betas=tc.adam_betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(  # every group's peak scaled by the same schedule
            optimizer, lambda s: lr_at(s, tc.warmup_steps, tc.max_steps, tc.lr, tc.min_lr) / tc.lr)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(cfg, world, gpu, accum))
        if state and state["world_size"] == world:
            engine.load_checkpoint(d, tag="deepspeed")
        elif state:
            with warnings.catch_warnings():  # stepped before the optimizer on purpose
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                for _ in range(start_step):
                    scheduler.step()  # keep the schedule where the run was
    if state and rank == 0:  # a restart (a resumed run, a resized or failed worker group) says where it went on
        other = state["world_size"] != world
        (log.warning if other else log.info)(
            "train %s: resumed at step %d on %d workers%s", tc.run_name, start_step, world,
            f" from a {state['world_size']}-worker checkpoint: weights restored, optimizer state restarted"
            if other else "")

    order = np.random.default_rng(tc.seed).permutation(len(train_data))

    def micro_rows(step: int, a: int, r: int) -> list[dict]:
        """The rows of micro-batch ``a`` of ``step`` on rank ``r``."""
        first = (step * accum + a) * tc.micro_batch_size * world + r * tc.micro_batch_size
        return [train_data[int(order[(first + i) % len(order)])] for i in range(tc.micro_batch_size)]

    def loss_of(batch: dict) -> torch.Tensor:
        return engine(batch["tokens"], batch.get("neighbors"), batch.get("neighbor_mask"), batch["targets"],
                      batch["loss_mask"], positions=batch.get("positions"))[1]

    def validate() -> float:
        engine.eval()
        total = torch.zeros(2, device=device)
        with torch.no_grad():
            for j in range(tc.eval_batches):
                first = (j * world + rank) * tc.micro_batch_size
                idx = [i % len(valid_data) for i in range(first, first + tc.micro_batch_size)]
                batch = to_batch([valid_data[i] for i in idx])
                count = batch["loss_mask"].sum()
                total += torch.stack([loss_of(batch).float() * count, count.float()])
        torch.distributed.all_reduce(total)
        engine.train()
        return math.exp(min(20.0, (total[0] / total[1]).item()))

    engine.train()
    tick, tokens_seen, loop_start = time.time(), 0, time.time()
    for step in range(start_step, tc.max_steps):
        step_start = time.time()
        batches = [to_batch(micro_rows(step, a, rank)) for a in range(accum)]
        weights = [batch["loss_mask"].sum().float() for batch in batches]  # per micro-batch
        step_weight = torch.stack(weights).sum()
        torch.distributed.all_reduce(step_weight)  # every rank's: the step's loss is one weighted mean
        total, step_tokens = 0.0, 0
        for batch, weight in zip(batches, weights):
            loss = loss_of(batch)  # the micro-batch's weighted mean
            # DeepSpeed divides by accum and averages over ranks: scaled so that the step's gradient is
            # that of the mean over all its weighted targets (per example: each example weighs 1)
            engine.backward(loss * weight * accum * world / step_weight)
            engine.step()
            total += loss.item() * weight.item()
            step_tokens += batch["tokens"].numel() * world
        tokens_seen += step_tokens
        done = step + 1
        step_examples = tc.micro_batch_size * accum * world  # a sample a row, or packed examples:
        if data.examples is not None:
            step_examples = sum(data.examples(row) for a in range(accum) for r in range(world)
                                for row in micro_rows(step, a, r))
        record = {"step": done, "loss": total / max(sum(w.item() for w in weights), 1e-9),
                  "lr": scheduler.get_last_lr()[0], "step_s": round(time.time() - step_start, 4),
                  "tokens": (history[-1].get("tokens", 0) if history else 0) + step_tokens,
                  "examples": (history[-1].get("examples", 0) if history else 0) + step_examples}
        if done % tc.eval_every == 0 or done == tc.max_steps:
            record["val_ppl"] = validate()
        history.append(record)
        if done % tc.log_every == 0 or "val_ppl" in record:
            elapsed = time.time() - tick
            memory = (torch.cuda.max_memory_allocated() if gpu else _rss()) / 2**20
            if rank == 0:
                log.info("train %s step %d/%d %s: loss %.4f%s, lr %.2e, %.0f tokens/s, %.0f MB", tc.run_name, done,
                         tc.max_steps, progress(done - start_step, tc.max_steps - start_step, time.time() - loop_start),
                         record["loss"], f", val ppl {record['val_ppl']:.2f}" if "val_ppl" in record else "",
                         record["lr"], tokens_seen / max(elapsed, 1e-9), memory)
            tick, tokens_seen = time.time(), 0
        if done % tc.checkpoint_every == 0 or done == tc.max_steps:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag="deepspeed")
                save_weights(engine, tc.zero_stage, rank, Path(tmp) / MODEL_DIR)
                if rank == 0:
                    (Path(tmp) / STATE).write_text(json.dumps(
                        {"step": done, "world_size": world, "history": history, "config": config["cfg"]}))
                ray.train.report({k: v for k, v in record.items()}, checkpoint=Checkpoint.from_directory(tmp))
        if config.get("crash_at_step") == done and not os.path.exists(config["crash_marker"]):
            Path(config["crash_marker"]).write_text(str(done))  # once: the restarted run goes on
            os.kill(os.getpid(), 9)


@dataclass
class TrainData:
    """What a training run reads: its rows, how rows become a batch, and how many examples a row holds."""

    train: Any  # rows by index: RetroSamples or the instruction rows
    valid: Any
    to_batch: Callable[[list[dict]], dict]
    examples: Callable[[dict], int] | None
    """How many examples a row holds (packed instruction rows); None: one."""


class SampleData:
    """The neighbour stage's samples (neighbours fed when ``train.retrieval``): what pretraining
    reads. A run is given its data (``fit(data=...)``), so the tuning stage gives its own rows."""

    name = "the neighbour samples"

    def __call__(self, cfg: Config, storage: Storage, device) -> TrainData:
        from retro_ray.database.files import ChunkStore, finished_db
        from retro_ray.retrieval.neighbors import RetroSamples

        store = ChunkStore.open(storage, db_dir(cfg), sorted(finished_db(cfg, storage).blocks))
        train, valid = (RetroSamples(cfg, storage, s, store) for s in ("train", "valid"))
        return TrainData(train, valid, lambda items: sample_batch(items, cfg.db.chunk_length, cfg.train.retrieval,
                                                                device), None)


def grad_accum(cfg: Config, data: TrainData, world: int) -> int:
    """Micro-batches per step: ``train.grad_accum``, or for rows that pack several examples (tuning)
    with ``instruct.batch_examples`` as many as make a step of about that many examples on ``world``
    ranks."""
    tc, target = cfg.train, cfg.instruct.batch_examples
    if not (target and data.examples):
        return tc.grad_accum
    per_row = sum(data.examples(data.train[i]) for i in range(len(data.train))) / max(len(data.train), 1)
    return max(1, round(target / (tc.micro_batch_size * world * per_row)))


def _initial_model(cfg: Config, storage: Storage, init: str | None):
    """The model a run starts from: a copy of the exported model ``init`` (instruction tuning
    starts from a pretrained run), else a fresh or retro-fitted one built from the config."""
    from retro_ray.database import tokenizer

    if init:
        from retro_ray.model.io import load_model

        return load_model(storage, init)
    vocab = len(tokenizer.load_run_tokenizer(cfg, storage))
    return build_model(cfg, vocab, cfg.neighbors.seq_len, tokenizer.finished_tokenizer(cfg, storage).content_hash())


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


RESUMABLE = ("max_steps", "num_workers", "cpus_per_worker", "log_every", "eval_every", "eval_batches",
             "checkpoint_every", "max_failures")
"""Train settings a run may change and still resume: a longer ``max_steps`` trains on, another
worker count resumes from the consolidated weights."""


def open_training(cfg: Config, storage: Storage, stage: str, inputs: dict, force: bool) -> Manifest:
    """The manifest of the training run ``train.run_name``: its config hash leaves out the
    ``RESUMABLE`` settings, and ``inputs`` are the content hashes of the stages it reads."""
    defaults = TrainConfig()
    weights_config = cfg.train.model_copy(update={k: getattr(defaults, k) for k in RESUMABLE})
    return open_stage(storage, run_dir(cfg), stage, config_hash(cfg.model, weights_config, cfg.db), inputs, force)


@locked(TOKENIZER, DB, SAMPLES, run_folder)
def run(cfg: Config, storage: Storage, force: bool = False, crash_at_step: int | None = None) -> dict:
    """The ``pretrain`` stage: fit (or resume) ``train.run_name``; export the model and curves.

    A run already trained for ``max_steps`` on the same inputs is recognised from its manifest
    without starting Ray Train; changed inputs (samples, database, tokenizer) are an error."""
    from retro_ray.database import tokenizer
    from retro_ray.database.files import finished_db

    inputs = {"tokenizer": tokenizer.finished_tokenizer(cfg, storage).content_hash(),
              "db": finished_db(cfg, storage).content_hash(),
              "samples": finished_stage(storage, samples_dir(cfg), "neighbors").content_hash()}
    return fit(cfg, storage, "pretrain", inputs, force, crash_at_step=crash_at_step)


def fit(cfg: Config, storage: Storage, stage: str, inputs: dict, force: bool = False, data=SampleData(),
        init: str | None = None, crash_at_step: int | None = None) -> dict:
    """Fit (or resume) the run ``train.run_name`` with Ray Train + DeepSpeed on ``data`` (the
    neighbour stage's samples, or the rows its caller gives), from the model folder ``init`` when
    given; export its model, history and loss curves. A finished run with the same inputs is
    returned as it is."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    out = run_dir(cfg)
    manifest = open_training(cfg, storage, stage, inputs, force)
    if manifest.complete and manifest.counts["steps"] >= tc.max_steps:
        log.info("%s %s: %s is up to date (%d steps)", stage, tc.run_name, out, manifest.counts["steps"])
        return {"step": manifest.counts["steps"], "history": storage.read_json(join(out, "history.json")),
                "model": model_dir(cfg)}
    manifest.complete = False
    manifest.save(storage, out)
    start = time.time()
    fs, path = storage.resolve(checkpoints_dir(cfg))
    loop_config = {"cfg": cfg.model_dump(mode="json"), "data": data, "init": init}
    if crash_at_step is not None:  # a real worker kill, for the resume test
        loop_config.update(crash_at_step=crash_at_step, crash_marker=str(Path(tempfile.gettempdir()) / f"crash-{tc.run_name}"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=_cluster_has_gpus(),
                                     resources_per_worker={"CPU": tc.cpus_per_worker, **cfg.resources.train}),
        run_config=RunConfig(name=tc.run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    workers = "-".join(map(str, tc.num_workers)) if isinstance(tc.num_workers, tuple) else tc.num_workers
    log.info("%s %s: starting Ray Train (%s workers, DeepSpeed ZeRO-%d) to step %d on %s%s", stage, tc.run_name,
             workers, tc.zero_stage, tc.max_steps, data.name,
             f", from {init or cfg.model.base}" if init or cfg.model.base else " (a new model)")
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE).read_text())
        storage.upload_dir(Path(d) / MODEL_DIR, model_dir(cfg))
    history = state["history"]
    storage.write_json(join(out, "history.json"), history)
    storage.write_bytes(join(out, "loss.png"), plot_curves({tc.run_name: history}))
    manifest.counts["steps"] = state["step"]
    manifest.timings["train_s"] = manifest.timings.get("train_s", 0.0) + time.time() - start
    manifest.complete = True
    manifest.save(storage, out)
    log.info("%s %s: %d steps, final loss %.4f -> %s", stage, tc.run_name, state["step"], history[-1]["loss"], out)
    return {"step": state["step"], "history": history, "model": model_dir(cfg)}


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def plot_curves(histories: dict[str, list[dict]]) -> bytes:
    """Training loss and validation perplexity of one or more runs, as PNG bytes."""


    fig, (ax_loss, ax_ppl) = subplots(1, 2, figsize=(10, 4))
    for name, history in histories.items():
        ax_loss.plot([h["step"] for h in history], [h["loss"] for h in history], label=name)
        val = [h for h in history if "val_ppl" in h]
        ax_ppl.plot([h["step"] for h in val], [h["val_ppl"] for h in val], marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_ppl.set(xlabel="step", ylabel="validation perplexity", title="validation perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.legend()
        ax.grid(alpha=0.3)
    return png(fig)


def compare(cfg: Config, storage: Storage, force: bool = False) -> dict:
    """GPT vs Retro on the same samples, steps and tokens: ``eval/gpt_vs_retro.{json,png}``.
    Retro is the ``pretrain`` run itself; its twin is trained (or found) as ``{run_name}-gpt``."""
    results = {name: run(run_cfg, storage, force) for name, run_cfg in pretrained_runs(cfg).items()}
    table = {name: {"val_ppl": r["history"][-1].get("val_ppl"), "final_loss": r["history"][-1]["loss"],
                    "steps": r["step"]} for name, r in results.items()}
    table["ppl_ratio"] = table["retro"]["val_ppl"] / table["gpt"]["val_ppl"]
    storage.write_json(join(eval_dir(cfg), "gpt_vs_retro.json"), table)
    storage.write_bytes(join(eval_dir(cfg), "gpt_vs_retro.png"),
                        plot_curves({n: r["history"] for n, r in results.items()}))
    log.info("GPT vs Retro: val ppl %.2f vs %.2f (ratio %.3f)", table["gpt"]["val_ppl"],
             table["retro"]["val_ppl"], table["ppl_ratio"])
    return table
