"""Every benchmark runs, alone, from a fresh clone: each script at toy sizes, its JSON line read.
(``bench/pipeline.py``, ``serve.py`` and ``generate.py`` run in ``test_pipeline.py`` on the main
job's run. Not here, for the suite's time: ``bench/qa.py`` needs the SmolLM2 tuning run;
``bench/embed.py`` and ``bench/robustness.py`` (``--cases 2 --no-drills``) build their own runs,
about 4 minutes together.)"""

import pytest

from conftest import bench

pytestmark = pytest.mark.slow


def test_model_step_and_gpu_checks_run_on_this_machine():
    _, step = bench("model_step.py", "--layers", "6", "--d-model", "32", "--heads", "4", "--encoder-d-model", "32",
                    "--seq-len", "128", "--micro-batch", "2", "--vocab", "512", "--steps", "2", "--warmup", "1")
    assert step["retro_step_s"] > 0 and step["params_retro"] > step["params_gpt"]
    _, gpu = bench("gpu.py", "--small")
    for check in ("embed", "train_smollm2", "train_1b", "faiss_ivf", "generate"):
        assert "skipped" not in gpu[check], (check, gpu[check])  # everything is installed here
    assert gpu["train_1b"]["tokens_per_s"] > 0 and gpu["embed"]["chunks_per_s"] > 0


def test_index_and_train_benchmarks_build_what_they_need(tmp_path):
    _, index = bench("index.py", "--docs", "10", "--queries", "50", "--out", str(tmp_path / "index"))
    assert index["recall_at_10"] > 0 and index["sharded_qps"] > 0
    lines, train = bench("train.py", "--docs", "10", "--steps", "3", "--seq-len", "128", "--d-model", "32",
                         "--micro-batch", "2", "--encoder-d-model", "32", "--out", str(tmp_path / "train"))
    assert train["step_ratio"] > 0 and train["retro_val_ppl"] > 0
    assert not [line for line in lines if "PlacementGroupCleaner" in line or "TrainController" in line]


def test_the_scale_benchmark_runs_at_toy_sizes(tmp_path):
    _, scale = bench("scale.py", "--docs", "20", "--chunks", "2000", "--big-mb", "20", "--out", str(tmp_path / "scale"))
    assert scale["units_of_one_big_file"] >= 2 and scale["neighbors_vs_local"] > 0
    assert scale["manifest_bytes_per_block"]["100"] == scale["manifest_bytes_per_block"]["10000"]
