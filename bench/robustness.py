"""Benchmark: the user-mistake table against the installed CLI, as a new user would meet it.

Builds a tiny finished run (tokenizer .. pretrain) and a run with skipped rows, then runs every
case of ``tests/robustness_cases.py`` as a ``retro-ray`` subprocess: exit code, one clear error
line, and seconds of work before the error (the case's wall time less that of ``retro-ray config
show``, the baseline: the same interpreter start and imports with no work). Then two drills:

- stale reuse: upstream stages rebuilt with ``--force`` (another vocabulary, another index), then
  a plain rerun of the stage after them must refuse, not reuse its old output;
- two runs at once: a second run on a workdir whose ``db`` is being rebuilt is refused, and the
  first ends with every block's files matching its manifest and no stray file.

    python bench/robustness.py [--out bench/out/robustness] [--cases N] [--no-drills]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import ROOT, WIKI  # noqa: E402
from robustness_cases import CASES, hold_lock, judge, make_inputs, snapshot  # noqa: E402

CLI = [sys.executable, "-m", "retro_ray.cli"]
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def tiny_config(workdir: Path, corpus: str) -> dict:
    return {
        "workdir": str(workdir),
        "corpus": {"sources": [{"name": "wiki", "paths": [corpus]}], "max_docs": 12},
        "tokenizer": {"vocab_size": 512},
        "db": {"block_size": 16},
        "embed": {"batch_size": 8, "max_actors": 1, "max_length": 128},
        "index": {"factory": "Flat", "shards": 1},
        "neighbors": {"seq_len": 256, "k_candidates": 8, "valid_fraction": 0.25},
        "model": {"d_model": 32, "n_layers": 4, "n_heads": 4, "encoder_layers": 1, "cca_layers": [2, 4]},
        "train": {"micro_batch_size": 2, "max_steps": 2, "checkpoint_every": 2, "eval_every": 2,
                  "eval_batches": 1, "warmup_steps": 1, "cpus_per_worker": 1},
    }


def cli(*args: str, check: bool = False) -> tuple[int, str, float]:
    start = time.time()
    proc = subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode:
        raise SystemExit(f"retro-ray {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start


def write_config(data: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def stale_reuse(config: str, built: Path, scratch: Path) -> dict:
    """Upstream rebuilt with --force, then a plain rerun downstream: 1 when it exits 0 (reused)."""
    drills = {
        "pretrain_after_new_vocabulary": (["tokenizer", "db", "index", "neighbors"],
                                          ["--set", "tokenizer.vocab_size=600"], "pretrain"),
        "neighbors_after_new_index": (["index"], ["--set", "index.factory=HNSW16"], "neighbors"),
    }
    result = {}
    for name, (rebuild, sets, downstream) in drills.items():
        copy = scratch / name
        shutil.copytree(built, copy)
        args = ["--config", config, "--set", f"workdir={copy}", *sets]
        for stage in rebuild:
            cli(stage, "--force", *args, check=True)
        code, output, _ = cli(downstream, *args)
        result[name] = {"reused": int(code == 0), "line": output.strip().splitlines()[-1]}
    return result


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def concurrent_runs(config: str, built: Path, scratch: Path) -> dict:
    """A db rebuild, and meanwhile a tokenizer rebuild on the same workdir."""
    copy = scratch / "concurrent"
    shutil.copytree(built, copy)
    args = ["--config", config, "--set", f"workdir={copy}"]
    first = subprocess.Popen([*CLI, "db", "--force", "--set", "db.block_size=8", *args], env=ENV, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (copy / "_locks" / "db.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    second, output, _ = cli("tokenizer", "--force", "--set", "tokenizer.vocab_size=600", *args)
    first_code = first.wait(timeout=600)
    manifest = json.loads((copy / "db" / "_manifest.json").read_text())
    bad = [name for name, b in manifest["blocks"].items()
           if _sha(copy / "db" / "chunks" / f"{name}.parquet") != b["chunks_sha256"]
           or _sha(copy / "db" / "embeddings" / f"{name}.parquet") != b["embeddings_sha256"]]
    stray = [p.name for kind in ("chunks", "embeddings") for p in (copy / "db" / kind).iterdir()
             if p.stem not in manifest["blocks"]]
    lost = int(first_code != 0 or not manifest["complete"] or bool(bad) or bool(stray) or second == 0)
    return {"first_exit": first_code, "second_exit": second, "second_line": output.strip().splitlines()[-1],
            "corrupted_blocks": bad, "stray_files": stray, "lost_or_corrupted": lost}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "robustness"))
    parser.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases (a quick check)")
    parser.add_argument("--no-drills", action="store_true", help="skip the stale-reuse and two-runs drills")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    inputs = make_inputs(out / "inputs")
    built_cfg = write_config(tiny_config(out / "built", str(WIKI)), out / "built.yaml")
    bad_cfg = write_config(tiny_config(out / "bad", inputs["bad"]), out / "bad.yaml")
    start = time.time()
    cli("pipeline", "--config", built_cfg, check=True)
    cli("tokenizer", "--config", bad_cfg, check=True)
    cli("db", "--config", bad_cfg, check=True)
    print(f"built the runs in {time.time() - start:.0f}s", flush=True)

    _, _, baseline_s = cli("config", "show", "--config", built_cfg)
    rows = []
    for case in CASES[:args.cases]:
        config, workdir = {"built": (built_cfg, out / "built"), "bad": (bad_cfg, out / "bad"),
                           "fresh": (built_cfg, out / "fresh" / case.name)}[case.workdir]
        before = snapshot(workdir)
        lock = hold_lock(workdir, case.hold_lock) if case.hold_lock else None
        code, output, wall = cli(*case.command(Path(config), workdir, inputs))
        if lock:
            lock.unlink()
        row = judge(case, code, output)
        row.update(wall_s=round(wall, 2), work_s=round(max(0.0, wall - baseline_s), 2),
                   unchanged=snapshot(workdir) == before, output_lines=len(output.strip().splitlines()))
        rows.append(row)
        print(f"{case.name:36s} exit {code} ({'ok' if row['exit_code_ok'] else 'WRONG'}), "
              f"{'clear' if row['clear_one_line'] else 'UNCLEAR'}, {row['work_s']:5.1f}s of work: {row['line']}",
              flush=True)
    stale, concurrent = {}, {"lost_or_corrupted": None}
    if not args.no_drills:
        stale = stale_reuse(built_cfg, out / "built", out / "scratch")
        concurrent = concurrent_runs(built_cfg, out / "built", out / "scratch")
    print(json.dumps({"stale": stale, "concurrent": concurrent}, indent=1), flush=True)
    config_cases = [r for r, c in zip(rows, CASES) if c.before_ray] or rows
    print(f"baseline (interpreter + imports, `config show`): {baseline_s:.2f}s", flush=True)
    print(json.dumps({
        "cases": len(rows),
        "clear_one_line": sum(r["clear_one_line"] for r in rows),
        "exit_code_ok": sum(r["exit_code_ok"] for r in rows),
        "unchanged": sum(r["unchanged"] for r in rows),
        "work_before_error_s_max": max(r["work_s"] for r in config_cases),
        "startup_baseline_s": round(baseline_s, 2),
        "stale_reuse": sum(d["reused"] for d in stale.values()) if stale else None,
        "lost_or_corrupted": concurrent["lost_or_corrupted"],
    }))


if __name__ == "__main__":
    main()
