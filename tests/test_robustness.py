"""A user's mistakes through the CLI: one clear line, exit code 2, no stage folder touched; no
stale reuse of a trained model; a second run on a busy workdir refused, the first intact."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config

from retro_ray.cli import main
from retro_ray.core.storage import Storage
from retro_ray.database import chunks, tokenizer
from retro_ray.database.corpus import BadInputError

from robustness_cases import CASES, error_lines, hold_lock, judge, make_inputs, snapshot


def write_config(cfg, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


@pytest.fixture(scope="module")
def built_run(ray_local, tmp_path_factory, wiki_parquet):
    """A finished pipeline (tokenizer .. 2 steps of pretraining): (config file, workdir)."""
    root = tmp_path_factory.mktemp("robust")
    cfg = tiny_config(root / "run", wiki_parquet, index={"factory": "Flat", "shards": 1},
                      neighbors={"seq_len": 256, "k_candidates": 8, "valid_fraction": 0.25},
                      train={"max_steps": 2, "checkpoint_every": 2, "eval_every": 2, "eval_batches": 1,
                             "warmup_steps": 1})
    config_file = write_config(cfg, root / "config.yaml")
    assert main(["pipeline", "--config", str(config_file)]) == 0
    return config_file, root / "run"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def bad_run(ray_local, tmp_path_factory, inputs):
    """Tokenizer and db of a corpus with five skipped rows: (config file, workdir)."""
    root = tmp_path_factory.mktemp("robust-bad")
    config_file = write_config(tiny_config(root / "run", inputs["bad"]), root / "config.yaml")
    assert main(["tokenizer", "--config", str(config_file)]) == 0
    assert main(["db", "--config", str(config_file)]) == 0
    return config_file, root / "run"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_user_mistake_is_one_clear_line_and_changes_nothing(case, built_run, bad_run, inputs, tmp_path, capsys):
    config_file, workdir = {"built": built_run, "bad": bad_run, "fresh": (built_run[0], tmp_path / "fresh")}[
        case.workdir]
    before = snapshot(workdir)
    lock = hold_lock(workdir, case.hold_lock) if case.hold_lock else None
    capsys.readouterr()
    try:
        code = main(case.command(config_file, workdir, inputs))
    finally:
        if lock:
            lock.unlink()
    out = capsys.readouterr()
    verdict = judge(case, code, out.out + out.err)
    assert verdict["exit_code_ok"] and verdict["clear_one_line"], (code, out.err[-2000:])
    assert snapshot(workdir) == before


def test_finished_pretrain_is_recognised_without_ray_train(built_run):
    config_file, workdir = built_run
    before = snapshot(workdir)
    assert main(["pretrain", "--config", str(config_file)]) == 0
    assert snapshot(workdir) == before  # no new checkpoint, no new export: Ray Train never started


def test_pretrain_on_changed_inputs_is_refused_not_reused(built_run, tmp_path, capsys):
    """The vocabulary changed (tokenizer rebuilt with --force): the old model is not reused, and
    the error names the changed input instead of a size-mismatch traceback."""
    config_file, workdir = built_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    args = ["--config", str(config_file), "--set", f"workdir={copy}"]
    assert main(["tokenizer", "--force", "--set", "tokenizer.vocab_size=600", *args]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--set", "tokenizer.vocab_size=600", *args]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "checkpoints/pretrain was built by stage 'pretrain' from different inputs (tokenizer changed)" in line
    assert "--force" in line


def test_samples_on_a_rebuilt_index_are_refused_not_reused(built_run, tmp_path, capsys):
    """Another factory string gives shards of the same ranges and sizes: still a changed input."""
    config_file, workdir = built_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    args = ["--config", str(config_file), "--set", f"workdir={copy}", "--set", "index.factory=HNSW16"]
    assert main(["index", "--force", *args]) == 0
    capsys.readouterr()
    assert main(["neighbors", *args]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "samples was built by stage 'neighbors' from different inputs (index changed)" in line


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # a drill: two runs at once
def test_second_run_on_a_busy_workdir_is_refused_and_the_first_finishes_intact(built_run, tmp_path, capsys):
    config_file, workdir = built_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    args = ["--config", str(config_file), "--set", f"workdir={copy}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen([sys.executable, "-m", "retro_ray.cli", "db", "--force", "--set", "db.block_size=8", *args],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = copy / "_locks" / "db.json"
    deadline = time.time() + 120
    while not lock.exists():
        assert first.poll() is None and time.time() < deadline, "the first run ended before it took its lock"
        time.sleep(0.1)
    capsys.readouterr()
    assert main(["tokenizer", "--force", "--set", "tokenizer.vocab_size=600", *args]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"pid {first.pid}" in line and "in use by another run" in line
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]

    manifest = json.loads((copy / "db" / "_manifest.json").read_text())
    assert manifest["complete"] and all(b["rows"] <= 8 for b in manifest["blocks"].values())
    for name, block in manifest["blocks"].items():
        assert _sha(copy / "db" / "chunks" / f"{name}.parquet") == block["chunks_sha256"]
        assert _sha(copy / "db" / "embeddings" / f"{name}.parquet") == block["embeddings_sha256"]
    for kind in ("chunks", "embeddings"):  # no stray file beside the listed blocks
        assert sorted(p.stem for p in (copy / "db" / kind).iterdir()) == sorted(manifest["blocks"])
    assert not list((copy / "_locks").iterdir())


def test_lone_surrogate_row_is_skipped_and_counted_or_named_under_strict(ray_local, tmp_path, wiki_docs):
    corpus = tmp_path / "surrogate.jsonl"
    rows = [json.dumps({"text": d["text"]}) for d in wiki_docs[:3]]
    rows.insert(1, '{"text": "valid JSON, but \\ud800 is no character"}')
    corpus.write_text("\n".join(rows) + "\n")
    cfg = tiny_config(tmp_path / "lenient", corpus)
    tokenizer.run(cfg, Storage())
    manifest = chunks.run(cfg, Storage())
    assert manifest.skipped == {"invalid_unicode": 1} and manifest.counts["docs"] == 3
    strict = tiny_config(tmp_path / "strict", corpus, strict=True)
    tokenizer.run(strict, Storage())
    with pytest.raises(BadInputError, match=r"surrogate\.jsonl:2: invalid_unicode \(strict: true\)"):
        chunks.run(strict, Storage())


def test_user_errors_are_found_inside_ray_wrappers(ray_local):
    """A mistake raised in a Ray task or an actor's constructor comes back wrapped (RayTaskError,
    ActorDiedError, with the remote traceback as text): the CLI still finds the one line."""
    import ray

    from index_actors.shard import TrainingSampleError
    from retro_ray.core.errors import find_user_error

    @ray.remote
    def read_row():
        raise BadInputError("corpus.jsonl:7: malformed_json (strict: true)")

    @ray.remote
    class Shard:
        def __init__(self):
            raise TrainingSampleError("index.factory 'IVF64,Flat' needs at least 64 training vectors")

        def ping(self):
            return True

    with pytest.raises(Exception) as task_error:
        ray.get(read_row.remote())
    assert find_user_error(task_error.value) == ("BadInputError", "corpus.jsonl:7: malformed_json (strict: true)")
    with pytest.raises(ray.exceptions.ActorDiedError) as actor_error:
        ray.get(Shard.remote().ping.remote())
    assert find_user_error(actor_error.value) == (
        "TrainingSampleError", "index.factory 'IVF64,Flat' needs at least 64 training vectors")
    assert find_user_error(RuntimeError("a bug")) is None
