"""cluster.yaml cannot drift: Ray's own cluster-config validator accepts it (what `ray up` runs after
filling in defaults), its pins are the versions tested here, and its job recipe names real flags."""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.fixture(scope="module")
def config() -> dict:
    with open(os.path.join(ROOT, "cluster.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_rays_validator_accepts_cluster_yaml_as_ray_up_prepares_it(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    # The check can fail: a misspelt key is refused by the same validator.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 2
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_pins_the_tested_versions_and_installs_the_package(config):
    import ray
    import torch

    setup = " ".join(config["setup_commands"])
    assert f'"ray[default,train]=={ray.__version__}"' in setup
    assert f'"torch=={torch.__version__.split("+")[0]}"' in setup
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert f"torch=={torch.__version__.split('+')[0]}" in ci
    mounted = {os.path.normpath(os.path.join(ROOT, src)) for src in config["file_mounts"].values()}
    assert os.path.normpath(ROOT) in mounted and 'pip install -e "~/ray_dyncheck' in setup
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_the_job_recipe_in_cluster_yaml_uses_flags_the_examples_take():
    text = open(os.path.join(ROOT, "cluster.yaml"), encoding="utf-8").read()
    recipe = " ".join(line.lstrip("# ").rstrip("\\ ") for line in text.splitlines() if line.startswith("#   "))
    assert "RAY_JOB_STOP_WAIT_TIME_S" in recipe
    for script in ("train_torch.py", "train_hf.py"):
        source = open(os.path.join(ROOT, "examples", script), encoding="utf-8").read()
        usage = set(re.findall(r'add_argument\("(--[a-z-]+)"', source))
        used = set(re.findall(r"(--[a-z][a-z-]+)", recipe.split("train_torch.py", 1)[1].split("printf")[0]))
        missing = sorted(flag for flag in used if flag not in usage)
        assert not missing, f"{script} has no {missing}"


def test_grafana_dashboard_queries_only_series_we_export():
    import json

    import ray_dyncheck._backends.ray as adapter

    dash = json.load(open(os.path.join(ROOT, "grafana", "dyncheck.json"), encoding="utf-8"))
    source = open(adapter.__file__, encoding="utf-8").read()
    exported = set(re.findall(r'(?:Counter|Gauge|Histogram)\("(dyncheck_\w+)"', source))
    assert len(exported) == 11
    used = {name for panel in dash["panels"] for target in panel["targets"]
            for name in re.findall(r"ray_(dyncheck_\w+)", target["expr"])}
    base = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert base <= exported, base - exported
    assert exported <= base, f"not on the dashboard: {exported - base}"
    page = open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8").read()
    assert all(f"`ray_{n}" in page for n in exported), "every series is in docs/operations.md's metrics table"
