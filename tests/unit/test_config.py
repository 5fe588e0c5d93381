"""Config validation: exact messages, Axolotl's block verbatim, YAML sources named in errors."""

from __future__ import annotations

import re

import pytest

import ray_dyncheck
from ray_dyncheck import DynamicCheckpointConfig, load_config

AXOLOTL_YAML = """\
base_model: some/model
output_dir: ./outputs
dynamic_checkpoint:
  enabled: true
  check_interval: 100 # Optional: check every N steps (default: 100)
  trigger_file_path: "axolotl_checkpoint.save" # Optional: custom filename
micro_batch_size: 2
"""


def test_public_names():
    assert sorted(ray_dyncheck.__all__) == [
        "Backend", "CheckpointInfo", "CheckpointRestoreError", "CheckpointUploadError", "Decision",
        "DynamicCheckpoint", "DynamicCheckpointConfig", "Kind",
        "LocalBackend", "Reason", "Request", "RunNotFoundError", "Source", "Stateful", "Status",
        "export_checkpoint", "fit", "load_config",
        "request_save",
        "run_status",
    ]


def test_defaults():
    cfg = DynamicCheckpointConfig()
    assert cfg.enabled is True
    assert cfg.check_interval == "auto" and cfg.auto_interval
    assert cfg.trigger_file_path == "dyncheck.save"
    assert cfg.save_steps is None
    assert cfg.max_check_overhead == 0.005
    assert (cfg.on_interrupt, cfg.interrupt_grace_s, cfg.signals) == ("weights", 120.0, ("SIGINT", "SIGTERM"))
    assert DynamicCheckpointConfig(signals=["SIGUSR1"]).signals == ("SIGUSR1",)


def test_axolotl_block_loads_verbatim(tmp_path):
    path = tmp_path / "axolotl.yaml"
    path.write_text(AXOLOTL_YAML)
    cfg = DynamicCheckpointConfig.from_yaml(path)
    assert cfg.enabled is True
    assert cfg.check_interval == 100
    assert cfg.trigger_file_path == "axolotl_checkpoint.save"


def test_bare_block_and_missing_block(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("enabled: true\ncheck_interval: 7\n")
    assert DynamicCheckpointConfig.from_yaml(bare).check_interval == 7
    other = tmp_path / "other.yaml"
    other.write_text("base_model: x\n")
    assert DynamicCheckpointConfig.from_yaml(other).enabled is False


def test_load_config_accepts_all_shapes(tmp_path):
    cfg = DynamicCheckpointConfig(check_interval=3)
    assert load_config(cfg) is cfg
    assert load_config({"check_interval": 3}) == cfg
    assert load_config({"dynamic_checkpoint": {"check_interval": 3}}) == cfg
    assert load_config(None) == DynamicCheckpointConfig()
    assert DynamicCheckpointConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"check_interval": 0},
         "dynamic_checkpoint.check_interval: got 0; set it to 'auto' or an integer >= 1 (steps between checks)"),
        ({"check_interval": "fast"},
         "dynamic_checkpoint.check_interval: got 'fast'; set it to 'auto' or an integer >= 1"),
        ({"check_interval": True}, "dynamic_checkpoint.check_interval: got True;"),
        ({"check_interval": 2.5}, "dynamic_checkpoint.check_interval: got 2.5;"),
        ({"enabled": "yes"}, "dynamic_checkpoint.enabled: got 'yes'; set it to true or false"),
        ({"trigger_file_path": ""},
         "dynamic_checkpoint.trigger_file_path: got ''; set it to a file name such as 'dyncheck.save'"),
        ({"trigger_file_path": "../outside.save"},
         "dynamic_checkpoint.trigger_file_path: got '../outside.save'; a relative path must stay inside "
         "the run directory; use an absolute path or URI to put the trigger elsewhere"),
        ({"trigger_file_path": "a/../../b"}, "dynamic_checkpoint.trigger_file_path: got 'a/../../b';"),
        ({"save_steps": 0}, "dynamic_checkpoint.save_steps: got 0; set it to an integer >= 1, or leave it out"),
        ({"max_check_overhead": 1.5},
         "dynamic_checkpoint.max_check_overhead: got 1.5; set it to a fraction between 0 and 1"),
        ({"poll_interval_s": 0}, "dynamic_checkpoint.poll_interval_s: got 0;"),
        ({"check_intervall": 5, "enable": True},
         "unknown dynamic_checkpoint key(s): check_intervall, enable; valid keys are check_interval, "
         "collective_timeout_s, commit_timeout_s, enabled, interrupt_grace_s, max_check_overhead, "
         "max_save_attempts, memory_snapshots, on_interrupt, on_preemption, poll_interval_s, save_mode, "
         "save_steps, signals, "
         "trigger_file_path"),
        ({"collective_timeout_s": 0}, "dynamic_checkpoint.collective_timeout_s: got 0; set it to a number of "
         "seconds > 0"),
        ({"max_save_attempts": 0}, "dynamic_checkpoint.max_save_attempts: got 0; set it to an integer >= 1"),
        ({"on_interrupt": "pause"},
         "dynamic_checkpoint.on_interrupt: got 'pause'; set it to 'weights', 'full' or 'none'"),
        ({"on_preemption": "stop"},
         "dynamic_checkpoint.on_preemption: got 'stop'; set it to 'auto', 'full', 'weights' or 'none'"),
        ({"interrupt_grace_s": -1}, "dynamic_checkpoint.interrupt_grace_s: got -1; set it to a number of seconds > 0"),
        ({"signals": ["SIGINT", "SIGNOPE"]},
         "dynamic_checkpoint.signals: got ['SIGINT', 'SIGNOPE']; set it to a list of signal names"),
    ],
)
def test_bad_values_name_field_value_and_fix(data, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        DynamicCheckpointConfig.from_dict(data)


def test_allowed_trigger_paths():
    assert DynamicCheckpointConfig(trigger_file_path="sub/../x.save").trigger_file_path == "sub/../x.save"
    assert DynamicCheckpointConfig(trigger_file_path="/abs/x.save")
    assert DynamicCheckpointConfig(trigger_file_path="s3://bucket/run/x.save")


def test_yaml_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("dynamic_checkpoint: [unclosed\n")
    with pytest.raises(ValueError, match=f"^invalid YAML in {re.escape(str(broken))}: "):
        DynamicCheckpointConfig.from_yaml(broken)
    bad = tmp_path / "bad.yaml"
    bad.write_text("dynamic_checkpoint:\n  check_interval: -1\n")
    with pytest.raises(ValueError, match=re.escape(f"got -1; set it to 'auto' or an integer >= 1 "
                                                   f"(steps between checks) (in {bad})")):
        DynamicCheckpointConfig.from_yaml(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("dynamic_checkpoint:\n  nope: 1\n")
    with pytest.raises(ValueError, match=re.escape(f"unknown dynamic_checkpoint key(s) in {unknown}: nope;")):
        DynamicCheckpointConfig.from_yaml(unknown)
    with pytest.raises(ValueError, match=re.escape(f"cannot read config file {tmp_path / 'missing.yaml'}")):
        DynamicCheckpointConfig.from_yaml(tmp_path / "missing.yaml")
    notmap = tmp_path / "list.yaml"
    notmap.write_text("dynamic_checkpoint: [1, 2]\n")
    with pytest.raises(ValueError, match=re.escape(f"dynamic_checkpoint must be a mapping of settings in {notmap}")):
        DynamicCheckpointConfig.from_yaml(notmap)


@pytest.mark.parametrize("uri,message", [
    ("s4://bucket/x.save", "use one of the schemes s3, gs, gcs, hdfs, viewfs, abfs, abfss, file"),
    ("s3:///x.save", "name the bucket: s3://<bucket>/<path>/dyncheck.save"),
    ("s3://bucket/", "name a file, e.g. s3://bucket/dyncheck.save"),
    ("gs://bucket", "name a file, e.g. gs://bucket/dyncheck.save"),
])
def test_a_trigger_uri_is_checked_by_the_config(uri, message):
    with pytest.raises(ValueError, match=re.escape(f"dynamic_checkpoint.trigger_file_path: got {uri!r}; {message}")):
        DynamicCheckpointConfig(trigger_file_path=uri)
