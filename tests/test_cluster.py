"""The cluster path users take: `cluster/local-fake.yaml` (Ray's fake_multinode autoscaler) starts
worker nodes for a `ray job submit` of `jobs/pipeline.py`, which runs every stage on them, Ray
Train and DeepSpeed included."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import _free_port, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cluster(tmp_path):
    """A head with no CPUs started from cluster/local-fake.yaml on free ports, with Ray's token
    authentication on; yields (job server address, environment for the `ray` CLI). Stops exactly
    the processes it started."""
    import ray

    port, dashboard, agent, client = (_free_port() for _ in range(4))
    config = yaml.safe_load((ROOT / "cluster" / "local-fake.yaml").read_text())
    config["provider"]["gcs_address"] = f"{ray.util.get_node_ip_address()}:{port}"  # not the default 6379
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(config))
    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    bin_dir = str(Path(sys.executable).parent)
    # RAY_AUTH_MODE=token: `ray job submit` sends the token (~/.ray/auth_token) only when it is set.
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    head = subprocess.Popen(
        # Free ports for every port with a fixed default: another Ray instance (the tests' own)
        # holds the dashboard agent's 52365, and the head's job agent would never come up.
        [f"{bin_dir}/ray", "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--num-cpus=0",
         "--object-store-memory=300000000", f"--autoscaling-config={config_file}", "--block"],
        env=env, stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        started = psutil.Process(head.pid).children(recursive=True)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        _, alive = psutil.wait_procs(started, timeout=15)
        for proc in alive:
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(env: dict, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([f"{Path(sys.executable).parent}/ray", *args], env=env, cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True)


def test_job_submit_runs_the_pipeline_on_autoscaled_workers(fake_cluster, tmp_path, wiki_parquet):
    address, env = fake_cluster
    cfg = tiny_config(tmp_path / "run", wiki_parquet, train={"max_steps": 2, "checkpoint_every": 2,
                                                             "eval_every": 2})
    config_file = tmp_path / "run.yaml"
    config_file.write_text(cfg.to_yaml())
    deadline = time.time() + 180
    while True:  # the head is starting: its job server answers first, its job agent a little later
        # No --working-dir on this one-machine cluster: see cluster/local-fake.yaml.
        job = ray_cli(env, "job", "submit", f"--address={address}", "--", "python",
                      str(ROOT / "jobs" / "pipeline.py"), "--config", str(config_file), "-v", timeout=900)
        output = job.stdout + job.stderr
        # Neither answer submitted anything: try again.
        not_up = "Failed to connect to Ray" in output or "No available agent to submit job" in output
        if not not_up or time.time() > deadline:
            break
        time.sleep(3)
    assert job.returncode == 0 and "succeeded" in output, output[-5000:]
    nodes = ray_cli(env, "list", "nodes", f"--address={address}", "--detail", "--format=json", timeout=60)
    assert any(not node["is_head_node"] for node in json.loads(nodes.stdout)), (
        "the autoscaler started no worker node, yet the head has no CPUs to run anything on")
    run = Path(cfg.workdir)
    for stage in ("tokenizer", "db", "index", "samples"):
        assert '"complete": true' in (run / stage / "_manifest.json").read_text(), stage
    assert (run / "checkpoints" / "pretrain" / "model" / "model.safetensors").exists()
    assert "pretrain pretrain: 2 steps" in output
