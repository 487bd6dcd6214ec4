"""bench/gpu_suite.py and bench/rank0_loading.py at tiny shapes on CPU, so the GPU kit never rots
before a GPU runs it: each runs end to end as a user would start it and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmhift.models.l0_module import PRUNING_MODULES

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_tiny_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    run = subprocess.run([sys.executable, "bench/gpu_suite.py", "--device", "cpu", "--tiny", "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "masked_over_plain" in run.stdout  # the printed table
    assert report["pruning_modules"] == list(PRUNING_MODULES)
    cases = report["cases"]
    assert set(cases) == {"throughput_sdpa", "plain", "masked", "hift_7b", "full_7b"}
    through = cases["throughput_sdpa"]
    assert through["ours_tokens_per_s"] > 0 and through["hf_tokens_per_s"] > 0
    assert through["ours_over_hf"] == pytest.approx(through["ours_tokens_per_s"] / through["hf_tokens_per_s"],
                                                    rel=0.01)
    for name in ("plain", "masked", "hift_7b"):
        assert cases[name]["step_s"] > 0 and cases[name]["peak_mib"] is None  # no allocator peak on a CPU
    # the estimates see each case's settings: masks add state, HiFT trains one block at a time
    assert cases["masked"]["estimate_mib"] > cases["plain"]["estimate_mib"]
    assert cases["hift_7b"]["estimate_mib"] < cases["full_7b"]["estimate_mib"]


@pytest.mark.slow  # two gloo ranks
def test_rank0_loading_tiny():
    run = subprocess.run([sys.executable, "bench/rank0_loading.py", "--tiny"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["params"] == 115008  # 2 x 256 x 64 (embedding, head) + 2 blocks x 57,472 + the final norm
    for rank in ("rank0", "rank1"):
        for arm in ("rank0", "naive"):
            figures = report["ranks"][rank][arm]
            assert figures["first_forward_s"] > 0
            assert figures["forward_peak_mb"] >= figures["load_peak_mb"] >= figures["held_after_load_mb"]
