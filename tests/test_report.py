"""JsonlLogger -> metrics.jsonl -> `python -m llmhift.report`: plots and a summary of what was logged."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from llmhift.build.config import ConfigError
from llmhift.build.trainer import LOGGERS, _build_named
from llmhift.loggers import JsonlLogger
from llmhift.report import main, read_metrics

DOMAINS = ("code", "docs")


def log_a_run(path, batches=12):
    """The metric keys the llmhift callbacks and Composer's monitors log, through the real logger."""
    logger = JsonlLogger(str(path))
    logger.init(None, None)
    for b in range(1, batches + 1):
        weight = min(0.5 + 0.04 * b, 0.9)
        logger.log_metrics({"loss/train/total": torch.tensor(6.0 - 0.2 * b), "throughput/tokens_per_sec": 900.0 + b,
                            "metrics/train/code_weight": weight, "metrics/train/docs_weight": 1 - weight,
                            "pruning/expected_params": 1000.0 - 40 * b, "pruning/target_params": 600.0,
                            "pruning/expected_sparsity/head": 0.04 * b, "pruning/target_sparsity/head": 0.4,
                            "hift/active_group": b % 3, "not/a/scalar": torch.zeros(3), "label": "text"}, step=b)
        if b % 4 == 0:
            logger.log_metrics({"metrics/eval/LanguageCrossEntropy": 5.0 - 0.1 * b,
                                "metrics/eval/code_LanguageCrossEntropy": 4.0 - 0.1 * b,
                                "metrics/eval/docs_LanguageCrossEntropy": 0.0 if b == 12 else 3.5,  # 0: no docs
                                "metrics/eval/LanguagePerplexity": float("nan")}, step=b)
    logger.close(None, None)


def test_logger_writes_scalars_and_resume_overrides(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "metrics.jsonl"
    log_a_run(path)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["batch"] == 1 and first["loss/train/total"] == pytest.approx(5.8)
    assert "not/a/scalar" not in first and "label" not in first  # only scalars are metrics
    resumed = JsonlLogger(str(path))  # an autoresumed run appends; its values win at the same batch
    resumed.init(None, None)
    resumed.log_metrics({"loss/train/total": 1.5}, step=12)
    resumed.close(None, None)
    series = read_metrics(path)
    assert series["loss/train/total"][12] == 1.5 and series["loss/train/total"][11] == pytest.approx(3.8)
    assert '"metrics/eval/LanguagePerplexity": null' in path.read_text()  # JSON has no NaN
    assert "metrics/eval/LanguagePerplexity" not in series


def test_report_plots_every_kind_and_summarises(tmp_path, capsys):
    log_a_run(tmp_path / "demo-prune" / "checkpoints" / "metrics.jsonl")
    assert main([str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'report' / 'report.md'}" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert names == [f"demo-prune_{k}.png" for k in ("hift", "loss", "proportions", "pruning", "throughput")]
    for name in names:
        pixels = matplotlib.image.imread(tmp_path / "report" / name)[..., :3].reshape(-1, 3)  # [H*W, RGB]
        assert len(np.unique((pixels * 255).round(), axis=0)) > 20, name
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## demo-prune" in text
    assert "final eval loss per domain: code 2.800, docs 3.500" in text  # docs' 0 at batch 12 is no loss
    assert "proportions first -> last: code 0.540 -> 0.900, docs 0.460 -> 0.100" in text
    assert "expected params at the end: 520 (target 600)" in text
    assert "sparsity expected / target: head 0.480 / 0.400" in text
    assert "HiFT groups trained: [0, 1, 2]" in text


def test_report_without_metrics_names_the_fix(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "loggers: {jsonl:" in capsys.readouterr().err


def test_jsonl_logger_needs_a_path():
    with pytest.raises(ConfigError, match="loggers.jsonl: path"):
        _build_named("loggers", LOGGERS, {"jsonl": {"path": ""}})


def test_runs_whose_names_read_alike_as_file_names_keep_their_own_plots(tmp_path):
    for run, batches in (("teamA/ck", 4), ("teamA_ck", 8)):  # both read teamA_ck as a file name
        logger = JsonlLogger(str(tmp_path / run / "metrics.jsonl"))
        for b in range(1, batches + 1):
            logger.log_metrics({"loss/train/total": 6.0 - 0.2 * b}, step=b)
        logger.close(None, None)
    assert main([str(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert names == ["teamA_ck-2_loss.png", "teamA_ck_loss.png"]
    text = (tmp_path / "report" / "report.md").read_text()
    sections = {part.splitlines()[0]: part for part in text.split("\n## ")[1:]}
    linked = {run: [line[line.index("(") + 1 : -1] for line in part.splitlines() if line.startswith("![")]
              for run, part in sections.items()}
    assert sorted(linked) == ["teamA/ck", "teamA_ck"]
    assert sorted(linked["teamA/ck"] + linked["teamA_ck"]) == names  # one plot each, none shared
    assert "- batches: 4" in sections["teamA/ck"] and "- batches: 8" in sections["teamA_ck"]
