"""Where everything of a run lives: one home for the folder of every stage and the model of every run.

    {workdir}/tokenizer/                      the tokenizer stage
    {workdir}/db/                             the chunk database (its files: ``database/files.py``)
    {workdir}/index/                          the Faiss shards and their layout
    {workdir}/samples/                        pretraining samples and their neighbours
    {workdir}/checkpoints/{run}/model/        the exported model of training run {run} (``train.run_name``)
    {workdir}/checkpoints/{run}-gpt/          its GPT twin: the same model and samples, no retrieval
    {workdir}/checkpoints/{run}-instruct/     the instruction-tuned Retro ({run}-gpt-instruct: the twin)
    {workdir}/instruct/data/                  packed instruction rows
    {workdir}/eval/                           reports; ``eval/db/`` the QA database copy (a run directory)
    {workdir}/logs/ray.log                    Ray's internals

Stages read these names from here, never spell them again. Imports only the core.
"""

from __future__ import annotations

from pathlib import Path

from retro_ray.core.config import Config
from retro_ray.core.manifest import MissingStageError
from retro_ray.core.storage import Storage, join
from retro_ray.model.io import CONFIG

TOKENIZER, DB, INDEX, SAMPLES, CHECKPOINTS = "tokenizer", "db", "index", "samples", "checkpoints"
INSTRUCT, EVAL, CORPUS, LOGS = "instruct", "eval", "corpus", "logs"
"""The stages' folders under a run's ``workdir`` (what a stage locks, ``locks.locked``, is one of
these or a training run's folder, ``run_folder``)."""
MODEL_DIR = "model"
"""The exported model inside a run's folder (Hugging Face style: safetensors and config)."""


def tokenizer_dir(cfg: Config) -> str:
    return join(cfg.workdir, TOKENIZER)


def db_dir(cfg: Config) -> str:
    return join(cfg.workdir, DB)


def index_dir(cfg: Config) -> str:
    return join(cfg.workdir, INDEX)


def samples_dir(cfg: Config) -> str:
    return join(cfg.workdir, SAMPLES)


def instruct_dir(cfg: Config) -> str:
    """The ``instruct`` stage's folder: its data (``instruct_data_dir``) and the tuning curves."""
    return join(cfg.workdir, INSTRUCT)


def instruct_data_dir(cfg: Config) -> str:
    return join(instruct_dir(cfg), "data")


def eval_dir(cfg: Config) -> str:
    return join(cfg.workdir, EVAL)


def corpus_file(workdir: str, name: str) -> str:
    """A corpus the run materialises itself (the embedded Python docs)."""
    return join(workdir, CORPUS, name)


def qa_workdir(cfg: Config) -> str:
    """The run directory of the QA database copy (the run's database plus the QA evidence)."""
    return join(eval_dir(cfg), "db")


def log_dir(cfg: Config) -> Path:
    """Where a run's log files go: ``{workdir}/logs``; a local folder named after the run when
    the run directory is on S3 (a log is appended to line by line)."""
    if "://" in cfg.workdir:
        return Path.home() / ".cache" / "retro-ray" / LOGS / cfg.workdir.split("://", 1)[1].replace("/", "_")
    return Path(cfg.workdir) / LOGS


def checkpoints_dir(cfg: Config) -> str:
    """Where every training run of the workdir keeps its folder (Ray Train's ``storage_path``)."""
    return join(cfg.workdir, CHECKPOINTS)


def run_folder(cfg: Config) -> str:
    """The folder of the training run ``train.run_name``, relative to the workdir."""
    return f"{CHECKPOINTS}/{cfg.train.run_name}"


def run_dir(cfg: Config) -> str:
    """The folder of the training run ``train.run_name``: checkpoints, history, curves, model."""
    return join(cfg.workdir, run_folder(cfg))


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


def served_model(cfg: Config, storage: Storage, given: str | None = None) -> str:
    """The model folder a run serves and generates with: ``given``, else its instruction-tuned
    Retro when it has been exported, else its pretrained one; it must exist."""
    tuned_path = model_dir(tuned(cfg))
    path = given or (tuned_path if storage.exists(join(tuned_path, CONFIG)) else model_dir(cfg))
    if not storage.exists(join(path, CONFIG)):
        raise MissingStageError(f"no exported model at {path}: run `retro-ray pretrain` first, or give --model")
    return path
