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
