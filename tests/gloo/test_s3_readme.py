"""The AWS CLI commands of the README and docs/ against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
from s3_local import S3_ENV, s3_server

AWS_ENV = S3_ENV


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a free port), with one bucket; stopped by pid afterwards."""
    with s3_server() as (port, _):
        yield f"s3://bucket/ray_results?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", port


def readme_aws_commands() -> list[str]:
    """Every AWS CLI command line the README and the docs/ pages give (table cells and code blocks)."""
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    pages = [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "*.md")))]
    lines = []
    for line in "\n".join(open(p, encoding="utf-8").read() for p in pages).splitlines():
        if "aws s3" not in line:
            continue
        cell = re.search(r"`([^`]*aws s3[^`]*)`", line)
        command = cell.group(1).replace("\\|", "|") if cell else line.split("  #")[0]
        lines.append(command.strip())
    return lines


def test_every_aws_cli_command_in_the_readme_works_against_the_bucket(s3):
    """The README's object-storage commands, run with the real AWS CLI against the S3 server: the
    trigger and the request they write are claimed by the request channel, and the receipt is read back."""
    from ray_dyncheck._requests.channel import RequestChannel

    _, port = s3
    commands = readme_aws_commands()
    assert len(commands) >= 3, commands
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    channel = RequestChannel(fs, "bucket/docs/run1", "dyncheck.save")
    claimed, outputs = [], []
    for command in commands:
        shell = command.replace("s3://bucket/prefix/run1", "s3://bucket/docs/run1").replace("aws s3", f"{aws} s3")
        if "receipts/" in command:  # answer what was claimed first: the receipt must exist to be read
            channel.retire(claimed, {"status": "ok", "step": 7, "kind": "weights", "checkpoint": "x"})
        done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{command!r} failed: {done.stderr}"
        outputs.append(done.stdout)
        claimed += channel.poll()
    by_source = {(r.source, r.kind, r.stop) for r in claimed}
    assert ("trigger", "full", False) in by_source and ("request", "weights", True) in by_source, claimed
    receipt = json.loads(outputs[-1])
    assert receipt["id"] == "w1" and receipt["status"] == "ok" and receipt["step"] == 7

