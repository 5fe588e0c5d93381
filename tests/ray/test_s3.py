"""Object storage: a real S3-compatible server (moto) on loopback holds the run; a TorchTrainer run
stores its checkpoints there and the CLI asks it for a checkpoint and a stop through the bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest
from s3_local import S3_ENV, s3_server

from ray_workloads import train_fn

CLI = os.path.join(os.path.dirname(sys.executable), "ray-dyncheck")
AWS_ENV = S3_ENV


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a free port), with one bucket; stopped by pid afterwards."""
    with s3_server() as (port, _):
        yield f"s3://bucket/ray_results?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", port


@pytest.fixture(scope="module")
def ray_s3(s3):
    import ray
    import ray_by_value

    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = "120"
    ray_by_value.register()
    ray.init(address="local", num_cpus=4, include_dashboard=False)  # workers inherit the AWS settings
    try:
        yield s3
    finally:
        ray.shutdown()


def cli(*args, timeout=180):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **AWS_ENV))


def fit_in_background(trainer, ready):
    """Start ``trainer.fit()`` in a thread; return once rank 0 has written ``ready`` (training runs)."""
    box = {}

    def run():
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # shown by the asserts below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.time() + 180
    while not ready.exists():
        assert thread.is_alive() and time.time() < deadline, box
        time.sleep(0.2)
    return thread, box


def test_run_on_s3_answers_the_cli(ray_s3, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage, port = ray_s3
    base, query = storage.split("?")
    run_uri = f"{base}/s3run?{query}"
    ready = tmp_path / "ready"
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"steps": 1_000_000, "step_time": 0.02, "out": str(tmp_path / "out"),
                           "dynamic_checkpoint": {"poll_interval_s": 0.2},
                           "actions": {"3": [f"ready:{ready}"]}},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="s3run", storage_path=storage),
    )
    thread, box = fit_in_background(trainer, ready)

    t0 = time.time()
    out = cli("save", run_uri, "--wait", "--timeout", 120)
    latency = time.time() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    uri = out.stdout.strip().splitlines()[-1]
    assert uri.startswith("s3://bucket/ray_results/s3run/checkpoint_"), uri
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    path = uri[len("s3://"):]
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.pt", "dyncheck.json", ".metadata.json"} <= names

    status = cli("status", run_uri)
    assert status.returncode == 0, status.stderr
    assert "1 checkpoint(s)" in status.stdout and "request" in status.stdout
    print(f"\nray-dyncheck save --wait on S3: {latency:.1f} s\n{status.stdout}")

    out = cli("stop", run_uri, "--wait", "--timeout", 120)
    assert out.returncode == 0, out.stdout + out.stderr
    thread.join(120)
    assert not thread.is_alive()
    meta = box["result"].checkpoint.get_metadata()
    assert (meta["kind"], meta["reason"]) == ("weights", "request")
    data = json.loads(cli("status", run_uri, "--json").stdout)
    assert [c["kind"] for c in data["checkpoints"]] == ["full", "weights"]
    assert data["pending"] == []


def test_slow_or_unreachable_request_path_never_stalls_training(ray_s3, tmp_path):
    """The trigger lives behind a proxy (the request path); Ray's own storage does not: latency and an
    outage hit only what rank 0's poller reads."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_dyncheck.client import list_checkpoints
    from tcp_proxy import Proxy

    storage, port = ray_s3
    proxy = Proxy(port)
    query = "scheme=http&region=us-east-1"
    trigger_uri = f"s3://bucket/triggers/go.save?endpoint_override=127.0.0.1:{proxy.port}&{query}"
    direct = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    progress, ready = tmp_path / "progress", tmp_path / "ready"
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"steps": 1_000_000, "step_time": 0.02, "out": str(tmp_path / "out"),
                           "progress": str(progress), "actions": {"3": [f"ready:{ready}"]},
                           "dynamic_checkpoint": {"poll_interval_s": 0.2, "trigger_file_path": trigger_uri}},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="slow", storage_path=storage),
    )
    thread, box = fit_in_background(trainer, ready)

    def step_now():
        lines = progress.read_text().split() if progress.exists() else []
        return int(lines[-2]) if lines else 0

    def touch():
        with direct.open_output_stream("bucket/triggers/go.save"):
            pass

    def wait_checkpoints(n, timeout=120):
        end = time.time() + timeout
        # Counted once Ray's metadata is there (a directory still uploading has none yet).
        while len(ckpts := [c for c in list_checkpoints(direct, "bucket/ray_results/slow") if c["step"]]) < n:
            assert time.time() < end, ckpts
            time.sleep(0.2)
        return ckpts

    rates = {}
    s0, t0 = step_now(), time.time()
    time.sleep(4)
    rates["no delay"] = (step_now() - s0) / (time.time() - t0)

    proxy.delay_s = 0.3  # every chunk on the request path waits 300 ms
    s0, t0 = step_now(), time.time()
    touch()
    [first] = wait_checkpoints(1)
    time.sleep(max(0.0, 4 - (time.time() - t0)))
    rates["300 ms per chunk"] = (step_now() - s0) / (time.time() - t0)
    assert first["reason"] == "trigger" and first["step"] > s0
    proxy.delay_s = 0.0

    proxy.cut()  # outage on the request path
    touch()
    s0, t0 = step_now(), time.time()
    time.sleep(5)
    s1 = step_now()
    rates["outage"] = (s1 - s0) / (time.time() - t0)
    assert len(list_checkpoints(direct, "bucket/ray_results/slow")) == 1, "nothing can be read: no save yet"
    assert s1 - s0 >= 20, "training went on during the outage"

    proxy.down = False  # recovery: the trigger written during the outage is served once it is readable
    [_, second] = wait_checkpoints(2)
    assert second["reason"] == "trigger" and second["step"] > s1
    out = cli("stop", f"{storage.split('?')[0]}/slow?{storage.split('?')[1]}", "--wait", "--timeout", 120)
    assert out.returncode == 0, out.stdout + out.stderr
    thread.join(120)
    proxy.close()
    print("\nsteps/s on 2 CPU workers: " + ", ".join(f"{k}: {v:.1f}" for k, v in rates.items()))


def test_hf_trainer_on_s3_stops_then_resumes_from_the_bucket(ray_s3, tmp_path):
    """Every rank's share of HF's checkpoint lands in one S3 checkpoint; hf_resume_path downloads it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import hf_workloads

    storage, port = ray_s3
    base, query = storage.split("?")
    ready = tmp_path / "ready"

    def trainer(out, steps, **extra):
        return TorchTrainer(
            hf_workloads.train_fn,
            train_loop_config={"steps": steps, "out": str(out), "save_strategy": "no",
                               "dynamic_checkpoint": {"check_interval": 5, "poll_interval_s": 0.2}, **extra},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name="hfrun", storage_path=storage),
        )

    thread, box = fit_in_background(trainer(tmp_path / "a", 100_000, step_time=0.05,
                                            actions={"3": [f"ready:{ready}"]}), ready)
    out = cli("stop", f"{base}/hfrun?{query}", "--full", "--wait", "--timeout", 120)
    assert out.returncode == 0, out.stdout + out.stderr
    thread.join(120)
    assert not thread.is_alive() and "error" not in box, box
    meta = box["result"].checkpoint.get_metadata()
    assert (meta["kind"], meta["reason"]) == ("full", "request")
    step = meta["step"]
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    path = out.stdout.strip().splitlines()[-1][len("s3://"):]
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
            "trainer_state.json", "dyncheck.json", ".metadata.json"} <= names

    trainer(tmp_path / "b", step + 5).fit()
    records = [json.load(open(tmp_path / "b" / f"rank{r}.json")) for r in range(2)]
    assert [r["begin_step"] for r in records] == [step, step], "resumed from the checkpoint in the bucket"
    assert records[0]["final_step"] == step + 5
