"""The demo pipeline end to end at a tiny size, each step run exactly as `scripts/demo_pipeline.py` prints it."""

import importlib
import runpy
import sys
from importlib.metadata import entry_points

import matplotlib.image
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmhift.callbacks import DynamicLoadingCallback, HiFTCallback, PruningCallback
from llmhift.report import read_metrics

sys.path.insert(0, "scripts")
from demo_pipeline import pipeline_commands  # noqa: E402

TARGET = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3,
          "intermediate_size": 176}


def run_in_process(command: list[str], monkeypatch) -> None:
    """`python -m M ARGS` as ``M.main(ARGS)``, `python X.py ARGS` as X run as __main__, in this
    interpreter (saves ~8 s of imports per step; runpy cannot run `test_*` modules under pytest)."""
    if command[1] == "-m":
        assert importlib.import_module(command[2]).main(command[3:]) == 0, command
        return
    monkeypatch.setattr(sys, "argv", command[1:])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(command[1], run_name="__main__")
    assert exit_info.value.code in (0, None), command


def test_callbacks_are_registered_for_llm_foundry():
    found = {e.name: e.load() for e in entry_points(group="llmfoundry_callbacks")}
    assert found == {"pruning": PruningCallback, "data_loading": DynamicLoadingCallback, "hift": HiFTCallback}


@pytest.mark.slow
def test_tiny_pipeline_produces_every_artifact(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    commands = pipeline_commands(root, "tiny", sys.executable)
    for command in commands:
        run_in_process(command, monkeypatch)
    out = capsys.readouterr().out

    # The pruned, continued model in HF format has the target shape and loads in transformers.
    continued = AutoModelForCausalLM.from_pretrained(root / "demo-continue" / "hf", local_files_only=True)
    assert {k: getattr(continued.config, k) for k in TARGET} == TARGET

    # Dynamic loading moved the mix during pruning and continued pretraining.
    for run in ("demo-prune", "demo-continue"):
        metrics = read_metrics(root / run / "checkpoints" / "metrics.jsonl")
        weights = [metrics[f"metrics/train/{d}_weight"] for d in ("code", "data", "docs", "reference")]
        moved = max(abs(w[max(w)] - w[min(w)]) for w in weights)
        assert moved > 0.05, (run, moved)

    # HiFT trained every group: every tensor of the final model differs from its starting point.
    before = load_file(root / "demo-continue" / "hf" / "model.safetensors")
    after = load_file(root / "demo-hift" / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged

    # The final HF model's logits equal the HiFT checkpoint's, and it generates with plain transformers.
    assert "(tolerance 1e-04): OK" in out
    assert "--- prompt: 'def read_file(path):'" in out

    # The report: one markdown file and non-trivial plots of every kind.
    report = root / "report"
    assert f"report: {report / 'report.md'}" in out
    pngs = sorted(report.glob("*.png"))
    kinds = {p.stem.split("_")[-1] for p in pngs}
    assert {"loss", "proportions", "pruning", "hift", "throughput"} <= kinds, kinds
    for png in pngs:
        assert png.stat().st_size > 10_000, png
        pixels = matplotlib.image.imread(png)[..., :3].reshape(-1, 3)  # [H*W, RGB]
        assert len(np.unique((pixels * 255).round(), axis=0)) > 20, png  # lines, text and colours
    text = (report / "report.md").read_text()
    for run in ("demo-pretrain", "demo-prune", "demo-continue", "demo-hift"):
        assert f"## {run}" in text and f"![{run}_loss]({run}_loss.png)" in text
