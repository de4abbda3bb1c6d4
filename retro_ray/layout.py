"""Where everything of a run lives: one home for the folder of every stage and the model of every run.

    {workdir}/tokenizer/                      the tokenizer stage
    {workdir}/db/                             the chunk database (files: ``dbfiles.py``)
    {workdir}/index/                          the Faiss shards and their layout
    {workdir}/samples/                        pretraining samples and their neighbours
    {workdir}/checkpoints/{run}/model/        the exported model of training run {run} (``train.run_name``)
    {workdir}/checkpoints/{run}-gpt/          its GPT twin: the same model and samples, no retrieval
    {workdir}/checkpoints/{run}-instruct/     the instruction-tuned Retro ({run}-gpt-instruct: the twin)
    {workdir}/instruct/data/                  packed instruction rows
    {workdir}/eval/                           reports; ``eval/db/`` the QA database copy (a run directory)
    {workdir}/logs/ray.log                    Ray's internals

Stages read these names from here, never spell them again. Imports only the config.
"""

from __future__ import annotations

from pathlib import Path

from retro_ray.config import Config
from retro_ray.storage import join

MODEL_DIR = "model"
"""The exported model inside a run's folder (Hugging Face style: safetensors and config)."""


def tokenizer_dir(cfg: Config) -> str:
    return join(cfg.workdir, "tokenizer")


def db_dir(cfg: Config) -> str:
    return join(cfg.workdir, "db")


def index_dir(cfg: Config) -> str:
    return join(cfg.workdir, "index")


def samples_dir(cfg: Config) -> str:
    return join(cfg.workdir, "samples")


def instruct_data_dir(cfg: Config) -> str:
    return join(cfg.workdir, "instruct", "data")


def eval_dir(cfg: Config) -> str:
    return join(cfg.workdir, "eval")


def qa_workdir(cfg: Config) -> str:
    """The run directory of the QA database copy (the run's database plus the QA evidence)."""
    return join(eval_dir(cfg), "db")


def log_dir(cfg: Config) -> Path:
    """Where a run's log files go: ``{workdir}/logs``; a local folder named after the run when
    the run directory is on S3 (a log is appended to line by line)."""
    if "://" in cfg.workdir:
        return Path.home() / ".cache" / "retro-ray" / "logs" / cfg.workdir.split("://", 1)[1].replace("/", "_")
    return Path(cfg.workdir) / "logs"


def run_dir(cfg: Config) -> str:
    """The folder of the training run ``train.run_name``: checkpoints, history, curves, model."""
    return join(cfg.workdir, "checkpoints", cfg.train.run_name)


def model_dir(cfg: Config) -> str:
    return join(run_dir(cfg), MODEL_DIR)


def retro(cfg: Config) -> Config:
    """The config of the run's Retro: ``train.run_name`` with retrieval."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"retrieval": True})})


def twin(cfg: Config) -> Config:
    """The config of the run's GPT twin: the same model, samples and steps, no retrieval, every
    weight trained (a frozen retro-fit's twin is the GPT continued on the same tokens), trained
    as ``{run_name}-gpt``."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "retrieval": False, "trainable": "all", "retrieval_lr": None, "run_name": f"{cfg.train.run_name}-gpt"})})


def tuned(cfg: Config) -> Config:
    """The config naming a run's instruction-tuned copy, ``{run_name}-instruct`` (its training
    settings are ``instruct.tuning_config``'s)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"retrieval": False, "run_name": f"{cfg.train.run_name}-instruct"})})


def pretrained_runs(cfg: Config) -> dict[str, Config]:
    """The pretrained runs that instruction tuning starts from: the Retro run and its GPT twin."""
    return {"retro": retro(cfg), "gpt": twin(cfg)}


def tuned_runs(cfg: Config) -> dict[str, Config]:
    """The pretrained runs the ``instruct`` stage tunes: the Retro run, and its twin unless
    ``instruct.twin`` is false."""
    return {name: run_cfg for name, run_cfg in pretrained_runs(cfg).items() if name == "retro" or cfg.instruct.twin}


def models(cfg: Config) -> dict[str, str]:
    """Every model folder of a run: pretrained ``retro`` / ``gpt``, tuned ``retro_instruct`` /
    ``gpt_instruct``."""
    out = {}
    for name, run_cfg in pretrained_runs(cfg).items():
        out[name] = model_dir(run_cfg)
        out[f"{name}_instruct"] = model_dir(tuned(run_cfg))
    return out
