import pytest
import yaml

from retro_ray.cli import main
from retro_ray.core.config import ConfigError, load_config


def test_defaults_run_the_embedded_setting():
    cfg = load_config()
    assert cfg.ray.address is None
    assert cfg.corpus.sources[0].paths == ["builtin:pydocs"]
    assert cfg.db.chunk_length == 64


def test_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    cfg = load_config(None, ["workdir=runs/x", "model.base=base"])
    assert cfg.workdir == str(tmp_path / "runs" / "x") and cfg.model.base == str(tmp_path / "base")
    assert load_config(None, ["workdir=s3://bucket/run", "model.base=org/name"]).workdir == "s3://bucket/run"
    assert load_config().workdir == str(tmp_path / "runs" / "default")  # the default too


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"embed": {"batchsize": 8}}))
    with pytest.raises(ConfigError, match=r"embed\.batchsize: Extra inputs are not permitted"):
        load_config(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"db": {"chunk_length": "sixty-four"}}))
    with pytest.raises(ConfigError, match=r"db\.chunk_length"):
        load_config(path)


def test_overrides_apply_and_validate():
    assert load_config(None, ["embed.batch_size=8"]).embed.batch_size == 8
    with pytest.raises(ConfigError, match=r"embed\.nope"):
        load_config(None, ["embed.nope=1"])


def test_config_show_prints_resolved_yaml(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"workdir": "s3://bucket/run", "db": {"block_size": 7}}))
    assert main(["config", "show", "--config", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["workdir"] == "s3://bucket/run"
    assert shown["db"] == {"chunk_length": 64, "block_size": 7}
    assert shown["embed"]["batch_size"] == 64


def test_cli_rejects_unknown_flags():
    with pytest.raises(SystemExit):
        main(["db", "--no-such-flag"])
