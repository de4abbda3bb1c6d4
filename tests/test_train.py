"""Training with real Ray Train + DeepSpeed (CPU, gloo): loss, resume, worker kill, world size."""

import json
from pathlib import Path

import pytest

from retro_ray.core.storage import Storage
from retro_ray.retrieval import index, neighbors
from retro_ray.training import pretrain


@pytest.fixture(scope="module")
def samples(built_db):
    cfg, _ = built_db
    cfg = cfg.model_copy(update={
        "index": cfg.index.model_copy(update={"factory": "Flat", "shards": 1}),
        "neighbors": cfg.neighbors.model_copy(update={"seq_len": 256, "k_candidates": 8, "valid_fraction": 0.25}),
        "model": cfg.model.model_copy(update={"d_model": 32, "n_layers": 4, "n_heads": 4, "encoder_layers": 1,
                                              "cca_layers": [2, 4]}),
        "train": cfg.train.model_copy(update={"micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2,
                                              "log_every": 2, "eval_batches": 2}),
    })
    index.run(cfg, Storage(), force=True)
    neighbors.run(cfg, Storage(), force=True)
    return cfg


def with_train(cfg, **kw):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=kw)})


def steps(history):
    return [h["step"] for h in history]


def test_short_run_lowers_the_loss_exports_and_resumes(samples):
    cfg = with_train(samples, run_name="short", max_steps=12, checkpoint_every=6, eval_every=6)
    first = pretrain.run(cfg, Storage(), force=True)
    history = first["history"]
    assert steps(history) == list(range(1, 13))
    assert history[-1]["loss"] < history[0]["loss"]
    assert [h["step"] for h in history if "val_ppl" in h] == [6, 12]
    out = Path(samples.workdir) / "checkpoints" / "short"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "model" / "config.json").read_text())["architecture"] == "Retro"
    more = pretrain.run(with_train(cfg, max_steps=16), Storage())  # same run name: resumes at step 12
    assert steps(more["history"]) == list(range(1, 17))
    assert more["history"][:12] == history


def test_a_frozen_retrofit_trains_only_the_retrieval_weights_and_resumes_so(samples):
    """RETRO's retro-fit (section 4.2): after training steps every other weight is bit-identical
    to the model it started from, the encoder and CCA moved; a resumed run keeps the same set."""
    import torch

    from retro_ray.model.io import load_model

    cfg = with_train(samples, run_name="frozen", trainable="retrieval", retrieval_lr=1e-2, max_steps=3,
                     checkpoint_every=3, eval_every=3)
    storage = Storage()
    torch.manual_seed(cfg.train.seed)  # the model the run starts from, built as its first worker builds it
    start = {k: v.clone() for k, v in pretrain._initial_model(cfg, storage, None).state_dict().items()}

    def check(model) -> None:
        end, new = model.state_dict(), model.retrieval_parameters()
        assert new and set(end) == set(start)
        assert all(torch.equal(end[k], start[k]) for k in end if k not in new)
        for part in ("encoder.", ".cca.attn.out.weight", ".cca.attn.q.weight"):
            assert any(part in k and not torch.equal(end[k], start[k]) for k in new), part

    first = pretrain.run(cfg, storage, force=True)
    check(load_model(storage, first["model"]))
    more = pretrain.run(with_train(cfg, max_steps=5), storage)  # resumes at step 3 with the same trainable set
    assert steps(more["history"]) == list(range(1, 6)) and more["history"][:3] == first["history"]
    check(load_model(storage, more["model"]))


@pytest.mark.slow  # a drill
def test_killed_worker_resumes_from_the_last_checkpoint(samples):
    cfg = with_train(samples, run_name="crash", max_steps=10, checkpoint_every=5, eval_every=5, max_failures=1)
    result = pretrain.run(cfg, Storage(), force=True, crash_at_step=8)  # SIGKILL after step 8
    assert steps(result["history"]) == list(range(1, 11))  # steps 6-8 redone once, none lost


@pytest.mark.slow  # a drill: a second worker
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_checkpoint_from_two_workers_loads_with_one(samples, zero_stage):
    cfg = with_train(samples, run_name=f"world-zero{zero_stage}", max_steps=4, checkpoint_every=4, eval_every=4,
                     num_workers=2, zero_stage=zero_stage)
    two = pretrain.run(cfg, Storage(), force=True)
    one = pretrain.run(with_train(cfg, num_workers=1, max_steps=6), Storage())
    assert steps(one["history"]) == list(range(1, 7)) and one["history"][:4] == two["history"]


def test_gpt_baseline_trains_on_the_same_samples(samples):
    table = pretrain.compare(with_train(samples, run_name="cmp", max_steps=4, checkpoint_every=4, eval_every=4),
                          Storage(), force=True)
    assert set(table) == {"gpt", "retro", "ppl_ratio"} and table["gpt"]["steps"] == table["retro"]["steps"] == 4
    assert (Path(samples.workdir) / "eval" / "gpt_vs_retro.png").exists()


@pytest.mark.slow  # a drill
def test_elastic_worker_range_trains(samples):
    result = pretrain.run(with_train(samples, run_name="elastic", max_steps=3, checkpoint_every=3, eval_every=3,
                                  num_workers=(1, 2)), Storage(), force=True)
    assert steps(result["history"]) == [1, 2, 3]


def test_whole_run_on_s3(samples, s3_endpoint):
    """Index, neighbours and training with the run directory on the moto S3 server."""
    from retro_ray.core.config import StorageConfig
    from retro_ray.database import chunks, tokenizer

    storage = Storage(StorageConfig(s3_endpoint=s3_endpoint))
    cfg = samples.model_copy(update={"workdir": "s3://retro/train-run",
                                     "storage": StorageConfig(s3_endpoint=s3_endpoint)})
    cfg = with_train(cfg, run_name="s3", max_steps=2, checkpoint_every=2, eval_every=2)
    tokenizer.run(cfg, storage)
    for stage in (chunks, index, neighbors):
        assert stage.run(cfg, storage).complete
    result = pretrain.run(cfg, storage)
    assert steps(result["history"]) == [1, 2]
    assert storage.exists("s3://retro/train-run/checkpoints/s3/model/model.safetensors")
    assert storage.exists("s3://retro/train-run/checkpoints/s3/loss.png")


def test_a_tuning_step_holds_about_batch_examples_examples():
    from retro_ray.core.config import Config
    from retro_ray.training.pretrain import TrainData, grad_accum

    rows = [{"positions": [0, 1, 2, 0, 1]}, {"positions": [0, 1, 0, 1, 2, 0]}]  # 2 and 3 examples a row
    tuning = TrainData(rows, rows, lambda items: items, lambda row: sum(p == 0 for p in row["positions"]))
    pretraining = TrainData(rows, rows, lambda items: items, None)  # one sample a row
    cfg = Config.model_validate({"train": {"micro_batch_size": 2, "grad_accum": 3}, "instruct": {"batch_examples": 40}})
    assert grad_accum(cfg, tuning, world=1) == 8  # 40 / (2 rows x 2.5 examples)
    assert grad_accum(cfg, tuning, world=2) == 4
    assert grad_accum(cfg, pretraining, world=1) == 3  # pretraining: train.grad_accum
    untuned = cfg.model_copy(update={"instruct": cfg.instruct.model_copy(update={"batch_examples": None})})
    assert grad_accum(untuned, tuning, world=1) == 3
