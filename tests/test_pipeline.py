"""The `retro-ray` command end to end on a tiny real corpus: every stage, rerun, inspection."""

import json

import yaml

from retro_ray.cli import main

from conftest import tiny_config


def test_pipeline_command_runs_every_stage_and_reruns_as_a_no_op(ray_local, tmp_path, wiki_parquet, capsys):
    cfg = tiny_config(tmp_path / "run", wiki_parquet, index={"factory": "Flat", "shards": 2},
                      neighbors={"seq_len": 256, "k_candidates": 8, "valid_fraction": 0.25})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    assert main(["pipeline", "--config", str(config_file)]) == 0
    for stage in ("tokenizer", "db", "index", "samples"):
        manifest = json.loads((tmp_path / "run" / stage / "_manifest.json").read_text())
        assert manifest["complete"], stage
    assert (tmp_path / "run" / "checkpoints" / "pretrain" / "model" / "model.safetensors").exists()
    first = (tmp_path / "run" / "samples" / "_manifest.json").read_text()
    assert main(["pipeline", "--config", str(config_file)]) == 0
    assert json.loads((tmp_path / "run" / "samples" / "_manifest.json").read_text())["blocks"] == \
        json.loads(first)["blocks"]

    capsys.readouterr()
    assert main(["index", "verify", "--config", str(config_file), "--queries", "20", "--k", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recall_at_3"] == 1.0
    assert main(["neighbors", "show", "0", "--config", str(config_file)]) == 0
    assert "chunk 0:" in capsys.readouterr().out


def test_changed_config_is_refused_without_force(ray_local, tmp_path, wiki_parquet):
    cfg = tiny_config(tmp_path / "run", wiki_parquet, corpus={"max_docs": 2})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    assert main(["tokenizer", "--config", str(config_file)]) == 0
    data = yaml.safe_load(config_file.read_text())
    data["tokenizer"]["vocab_size"] = 600
    config_file.write_text(yaml.safe_dump(data))
    assert main(["tokenizer", "--config", str(config_file)]) == 2
    assert main(["tokenizer", "--config", str(config_file), "--force"]) == 0


def test_the_main_job_serves_the_tuned_model_and_prints_its_answer_on_a_quiet_terminal(tmp_path, wiki_parquet):
    """What `retro-ray pipeline` does on a fresh machine, on a tiny model: every stage, then the
    app is asked a question over HTTP; the terminal shows the project's lines, not Ray's."""
    import subprocess
    import sys
    from pathlib import Path

    from retro_ray.runtime import RAY_LINE

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = tiny_config(tmp_path / "run", wiki_parquet, index={"factory": "Flat", "shards": 2},
                      neighbors={"seq_len": 512, "k_candidates": 8, "valid_fraction": 0.25},
                      instruct={"sources": [{"name": "pydocs", "paths": [str(configs / "pydocs-instruct.jsonl")]}],
                                "max_examples": 24, "max_steps": 2},
                      eval={"qa": [{"name": "pydocs", "path": str(configs / "pydocs-qa.jsonl"), "max_questions": 4}],
                            "max_new_tokens": 4, "ppl_samples": 2},
                      serve={"question": "What is the Python module textwrap for?",
                             "demo": str(configs / "demo-questions.jsonl")})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    done = subprocess.run([str(Path(sys.executable).parent / "retro-ray"), "pipeline", "--config", str(config_file)],
                          capture_output=True, text=True, timeout=900)
    terminal = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(terminal[-40:])
    asked = next(i for i, line in enumerate(terminal) if line.startswith("retro-ray: asked http://127.0.0.1:"))
    assert terminal[asked + 2].strip()  # the answer
    passages = [line for line in terminal if line.startswith("  [") and ", chunk " in line]
    assert 1 <= len(passages) <= 3  # serve.passages retrieved for the question (as many as fit the context)
    assert all(line.split("): ", 1)[1].split(": ", 1)[0] for line in passages)  # each printed with its title
    assert any(line.endswith("eval/qa.md") for line in terminal)
    demo = json.loads((tmp_path / "run" / "eval" / "demo.json").read_text())  # the demo questions, each asked
    assert demo["asked"] == 11 and len(demo["rows"]) == 11 and all(r["answer"] is not None for r in demo["rows"])
    shown = next(line for line in terminal if line.startswith("demo questions ("))
    assert shown.endswith(f"{demo['correct']} of 11 answers hold a gold answer")
    assert any("pipeline: stage 7/7 eval" in line for line in terminal)
    assert [line for line in terminal if RAY_LINE.search(line)] == []  # Ray's own lines went to the log
    assert [line for line in terminal if " DEBUG " in line] == []  # no library's debug lines (bm25s sets DEBUG)
    ray_log = (tmp_path / "run" / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log and "Running Dataset" not in "\n".join(terminal)
