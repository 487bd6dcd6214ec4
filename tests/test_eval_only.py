"""``python train.py YAML --eval-only`` (and ``max_duration: 0ba``): load, evaluate every evaluator, log
the metrics, exit 0, write no checkpoint; including on a finished run's own checkpoint and folder."""

import json
import os
from pathlib import Path

import pytest

import train

DEMO_YAML = "yamls/demo/pretrain.yaml"
DOMAINS = ("code", "data", "docs", "reference")
CE = "metrics/eval/LanguageCrossEntropy"


def overrides(demo_root, folder, *extra):
    return [f"variables.data_root={demo_root}", f"save_folder={folder}", "progress_bar=false",
            "log_to_console=false", "device_eval_batch_size=128", *extra]  # fmt: skip


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: os.readlink(p).encode() if p.is_symlink() else p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("how", [["--eval-only"], ["max_duration=0ba"]], ids=["flag", "zero_duration"])
def test_eval_only_logs_every_domain_and_writes_no_checkpoint(how, demo_root, tmp_path, capsys):
    folder = tmp_path / "eval"
    assert train.main([DEMO_YAML, *overrides(demo_root, folder), *how]) == 0
    assert "eval at batch 0: " in capsys.readouterr().out
    (logged,) = [r for r in records(folder) if CE in r]
    assert logged["batch"] == 0 and 5.0 < logged[CE] < 9.0, logged  # an untrained model: near ln 2048 = 7.6
    for domain in DOMAINS:
        assert logged[f"metrics/eval/{domain}_LanguageCrossEntropy"] > 0, (domain, logged)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "run.lock"]  # no checkpoint, no config


@pytest.mark.slow
def test_eval_only_measures_a_finished_runs_checkpoint_in_its_own_folder(demo_root, tmp_path, capsys):
    folder = tmp_path / "run"
    run = overrides(demo_root, folder, "max_duration=4ba", "save_interval=2ba", "eval_interval=4ba", "run_name=done")
    assert train.main([DEMO_YAML, *run]) == 0
    (trained,) = [r for r in records(folder) if CE in r]  # the run's own evaluation, at its end
    checkpoints = {k: v for k, v in snapshot(folder).items() if k != "metrics.jsonl"}

    for how in (["load_path=" + str(folder / "ep0-ba4-rank0.pt")], ["autoresume=true"]):
        capsys.readouterr()
        assert train.main([DEMO_YAML, *run, "--eval-only", *how]) == 0, capsys.readouterr().err
        measured = [r for r in records(folder) if CE in r][-1]
        assert measured["batch"] == 4 and measured[CE] == pytest.approx(trained[CE], abs=1e-6), (measured, trained)
        assert {k: v for k, v in snapshot(folder).items() if k != "metrics.jsonl"} == checkpoints  # nothing written


def test_eval_only_without_an_eval_loader_is_one_line(demo_root, tmp_path, capsys):
    assert train.main([DEMO_YAML, *overrides(demo_root, tmp_path / "eval"), "eval_loader=null", "--eval-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: eval_loader:") and err.count("\n") == 0, err
    assert not (tmp_path / "eval").exists()
