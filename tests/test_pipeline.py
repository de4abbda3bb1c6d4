"""The `retro-ray` command end to end on a tiny real corpus: every stage, rerun, inspection."""

import json

import pytest
import yaml

from conftest import ROOT, bench, tiny_config

from retro_ray.cli import main


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


@pytest.fixture(scope="module")
def main_job(tmp_path_factory, wiki_parquet):
    """`retro-ray pipeline` on a tiny model through ``bench/pipeline.py`` (which shows the job's
    terminal line for line, then its figures): (config file, run directory, terminal, figures)."""
    tmp_path = tmp_path_factory.mktemp("main-job")
    configs = ROOT / "configs"
    cfg = tiny_config(tmp_path / "run", wiki_parquet, index={"factory": "Flat", "shards": 2},
                      # the tiny BPE spends ~2 characters a token: a question with its three passages fits 1024
                      neighbors={"seq_len": 1024, "k_candidates": 8, "valid_fraction": 0.25},
                      instruct={"sources": [{"name": "pydocs", "paths": [str(configs / "pydocs-instruct.jsonl")]}],
                                "max_examples": 24, "max_steps": 2, "twin": False},  # as the quickstart
                      eval={"qa": [{"name": "pydocs", "path": str(configs / "pydocs-qa.jsonl"), "max_questions": 4}],
                            "max_new_tokens": 4, "ppl_samples": 2},
                      serve={"question": "What is the Python module textwrap for?",
                             "demo": str(configs / "demo-questions.jsonl")})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    lines, figures = bench("pipeline.py", "--config", str(config_file), "--workdir", str(tmp_path / "run"))
    end = max(i for i, line in enumerate(lines) if line.startswith("exit code "))
    return config_file, tmp_path / "run", lines[:end - 1], figures  # the job's lines, not the bench's summary


@pytest.mark.slow
def test_the_main_job_serves_the_tuned_model_and_prints_its_answer_on_a_quiet_terminal(main_job):
    """What `retro-ray pipeline` does on a fresh machine, on a tiny model: every stage, then the
    app is asked a question over HTTP; the terminal shows the project's lines, not Ray's."""
    from retro_ray.core.runtime import RAY_LINE

    _, run, terminal, figures = main_job
    assert figures["exit_code"] == 0 and figures["ray_internal_lines"] == 0, figures
    assert set(figures["stages"]) >= {"tokenizer", "db", "pretrain", "instruct", "eval", "serve"}
    asked = next(i for i, line in enumerate(terminal) if line.startswith("retro-ray: asked http://127.0.0.1:"))
    assert terminal[asked + 2].strip() and figures["answer"] == terminal[asked + 2]  # the answer
    passages = [line for line in terminal if line.startswith("  [") and ", chunk " in line]
    assert 1 <= len(passages) <= 3  # serve.passages retrieved for the question (as many as fit the context)
    assert all(line.split("): ", 1)[1].split(": ", 1)[0] for line in passages)  # each printed with its title
    assert any(line.endswith("eval/qa.md") for line in terminal)
    demo = json.loads((run / "eval" / "demo.json").read_text())  # the demo questions, each asked
    assert demo["asked"] == 11 and len(demo["rows"]) == 11 and all(r["answer"] is not None for r in demo["rows"])
    shown = next(line for line in terminal if line.startswith("demo questions ("))
    assert shown.endswith(f"{demo['correct']} of 11 answers hold a gold answer")
    assert any("pipeline: stage 7/7 eval" in line for line in terminal)
    assert [line for line in terminal if RAY_LINE.search(line)] == []  # Ray's own lines went to the log
    assert [line for line in terminal if " DEBUG " in line] == []  # no library's debug lines (bm25s sets DEBUG)
    ray_log = (run / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log and "Running Dataset" not in "\n".join(terminal)


@pytest.mark.slow
def test_the_serving_and_generation_benchmarks_run_on_the_main_jobs_model(main_job):
    config_file, run, *_ = main_job
    _, served = bench("serve.py", "--config", str(config_file), "--workdir", str(run), "--no-vllm",
                      "--requests", "8", "--clients", "4", "--port", "8497", "--hol-tries", "1")
    assert served["same_tokens"] and served["poison_isolated"] and served["tokens_per_s"]["continuous"] > 0
    _, generated = bench("generate.py", "--config", str(config_file), "--workdir", str(run), "--no-smollm2",
                         "--new-tokens", "16")
    assert generated["same_tokens"] and generated["kv_speedup"] > 0
