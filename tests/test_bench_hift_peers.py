"""`bench/hift_memory.py --peers` (bench/hift_peers.py) offline, as CI runs it: a missing peer is
skipped with a message naming the command that installs it, and llmhift's arms still run and report their per-step breakdown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


@pytest.mark.slow  # three processes
def test_peers_absent_offline_are_skipped_and_llmhift_arms_still_measured(tmp_path):
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "hift_memory.py"), "--peers", "--tiny", "--offline",
                          f"--peers-dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    install = f"pip install --target {tmp_path} --no-deps badam==1.4"
    assert f"skipped: badam is not in {tmp_path}; install it with: " in out.stderr and install in out.stderr
    report = json.loads(out.stdout)
    assert list(report["skipped"]) == ["badam"]
    assert set(report["median"]) == {"llmhift_reset", "llmhift_keep"} and report["ratio_llmhift_reset_vs_badam"] == {}
    for arm in report["median"].values():
        parts = arm["forward_s"] + arm["backward_s"] + arm["optimizer_s"] + arm["callback_s"]
        assert 0 < parts <= arm["step_s"] * 1.25  # medians of the parts: about the step they split
        assert arm["peak_optimizer_state_mb"] > 0
    assert not list(tmp_path.iterdir())  # offline: nothing installed
