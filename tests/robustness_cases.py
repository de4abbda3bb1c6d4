"""The table of user mistakes, shared by ``tests/test_robustness.py`` (in-process ``main``) and
``bench/robustness.py`` (the installed CLI in subprocesses).

Each case runs one ``retro-ray`` command on one of three run folders and expects an exit code
and one ``retro-ray: error:`` line matching ``message``, with no stage folder touched:

    built  a finished pipeline (tokenizer .. pretrain) on a tiny corpus
    bad    tokenizer and db of a corpus with skipped rows
    fresh  an empty folder, new for each case
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ERROR_PREFIX = "retro-ray: error: "


@dataclass
class Case:
    name: str
    workdir: str  # "built", "bad" or "fresh"
    argv: list[str]  # the command and its arguments; {name} placeholders are input files
    message: str  # regex the error line must match
    code: int = 2
    hold_lock: str | None = None  # a stage folder another live run holds during the case
    before_ray: bool = True  # a config mistake, found before Ray starts (else a stage finds it)

    def command(self, config_file: Path, workdir: Path, inputs: dict[str, str]) -> list[str]:
        args = [a.format(**inputs) for a in self.argv]
        return [*args, "--config", str(config_file), "--set", f"workdir={workdir}"]


CASES = [
    Case("seq_len_not_a_multiple_of_chunk", "built", ["neighbors", "--set", "neighbors.seq_len=100"],
         r"neighbors\.seq_len=100 must be a multiple of db\.chunk_length=64"),
    Case("k_candidates_below_k", "built", ["neighbors", "--set", "neighbors.k_candidates=1"],
         r"neighbors\.k_candidates=1 must be at least neighbors\.k=2"),
    Case("factory_faiss_cannot_parse", "built", ["index", "--force", "--set", "index.factory=IVFfoo,Flat"],
         r"index\.factory='IVFfoo,Flat': .*could not parse"),
    Case("factory_pq_not_dividing_dim", "built", ["index", "--force", "--set", "index.factory=PQ7"],
         r"index\.factory='PQ7': .*384-dimensional"),
    Case("factory_needs_more_training", "built",
         ["index", "--force", "--set", "index.factory=IVF4096,Flat", "--set", "index.train_size=1000"],
         r"index\.factory='IVF4096,Flat' needs at least 4096 training vectors"),
    Case("tokenizer_path_missing", "built", ["tokenizer", "--force", "--set", "tokenizer.path=./no/such/tokenizer"],
         r"tokenizer\.path='\./no/such/tokenizer': no such file or folder"),
    Case("hub_name_not_cached", "built", ["tokenizer", "--force", "--set", "tokenizer.path=someorg/no-such-model"],
         r"tokenizer\.path='someorg/no-such-model': not a local file or folder, and not in the Hugging Face cache"),
    Case("base_model_missing", "built", ["pretrain", "--force", "--set", "model.base=/no/such/model.gguf"],
         r"model\.base='/no/such/model\.gguf': no such file or folder"),
    Case("unknown_config_key", "built", ["db", "--set", "embed.batchsize=8"],
         r"embed\.batchsize: Extra inputs are not permitted"),
    Case("elastic_range_reversed", "built", ["pretrain", "--set", "train.num_workers=[2, 1]"],
         r"train\.num_workers=\[2, 1\] must be a range \[min, max\] with 0 < min <= max"),
    Case("parquet_without_text_column", "fresh",
         ["tokenizer", "--set", "corpus.sources=[{{name: w, paths: ['{nocol}']}}]"],
         r"nocol\.parquet: no column 'text' \(columns: body\); set text_field of corpus 'w'"),
    Case("corpus_files_missing", "fresh",
         ["tokenizer", "--set", "corpus.sources=[{{name: w, paths: ['{missing}']}}]"],
         r"corpus 'w': no files match '.*no-such-corpus/\*\.jsonl'"),
    Case("db_before_tokenizer", "fresh", ["db"], r"tokenizer has not been built: run `retro-ray tokenizer` first",
         before_ray=False),
    Case("all_rows_bad", "fresh", ["tokenizer", "--set", "corpus.sources=[{{name: w, paths: ['{allbad}']}}]"],
         r"no document to train on: every input row was skipped \(empty=1, malformed_json=1, missing_text_field=1\)",
         before_ray=False),
    Case("strict_on_a_db_with_skipped_rows", "bad", ["db", "--set", "strict=true"],
         r"db was built with 5 bad input rows skipped \(empty=2, malformed_json=1, missing_text_field=1, "
         r"non_utf8=1\), and strict is on", before_ray=False),
    Case("stage_held_by_another_run", "built", ["db", "--force", "--set", "db.block_size=8"],
         r"is in use by another run: 'holder-of-the-lock' \(host .*, pid \d+, started .*\)", hold_lock="db",
         before_ray=False),
    Case("sample_out_of_range", "built", ["neighbors", "show", "999"], r"sample 999 not in the train split",
         before_ray=False),
]


def make_inputs(folder: Path) -> dict[str, str]:
    """The bad input files the cases name."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"body": ["a text in the wrong column"]}), folder / "nocol.parquet")
    (folder / "allbad.jsonl").write_text('{"text": "unterminated\n{"body": "no text field"}\n\n')
    good = [json.dumps({"text": f"Document {i} is about {topic}. " * 30}).encode()
            for i, topic in enumerate(("retrieval", "chunked cross-attention", "sharded indexes"))]
    (folder / "bad.jsonl").write_bytes(b"\n".join([  # five bad rows (lines 2-6) among three good ones
        good[0], b'{"text": "unterminated', b'{"body": "no text field"}', b'{"text": "caf\xe9 latin-1"}',
        b'{"text": "   "}', b"", good[1], good[2]]) + b"\n")
    return {"nocol": str(folder / "nocol.parquet"), "allbad": str(folder / "allbad.jsonl"),
            "bad": str(folder / "bad.jsonl"), "missing": str(folder / "no-such-corpus" / "*.jsonl")}


def snapshot(workdir: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``workdir`` but the lock folder and the log (``logs/ray.log`` grows with
    every command that starts Ray), with its size and modification time."""
    if not workdir.exists():
        return {}
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in workdir.rglob("*") if p.is_file() and not {"_locks", "logs"} & set(p.parts)}


def hold_lock(workdir: Path, folder: str) -> Path:
    """Write the lock of ``folder`` as a live run would: this process, another token."""
    from retro_ray.core.locks import lock_uri

    path = Path(lock_uri(str(workdir), folder))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "started": psutil.Process().create_time(), "command": "holder-of-the-lock",
                                "token": uuid.uuid4().hex, "heartbeat": time.time()}))
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(ERROR_PREFIX)]


def judge(case: Case, code: int, output: str) -> dict:
    """Whether the run gave the expected exit code and exactly one matching error line, and no
    traceback."""
    lines = error_lines(output)
    clear = (len(lines) == 1 and re.search(case.message, lines[0]) is not None
             and "Traceback" not in output)
    return {"case": case.name, "exit_code_ok": code == case.code, "clear_one_line": clear,
            "line": lines[0] if lines else (output.strip().splitlines() or [""])[-1]}
