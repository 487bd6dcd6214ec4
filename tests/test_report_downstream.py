"""downstream.json records -> `python -m llmhift.report`: the before/after table and accuracy against tokens."""

import json

import pytest

from llmhift.downstream import RESULTS_NAME, SUITES
from llmhift.loggers import JsonlLogger
from llmhift.paper_results import PAPER_AVERAGE
from llmhift.report import accuracy_series, main, order_records, plot_accuracy


def task(acc, acc_norm=None, shots=0, limit=None):
    metrics = {"acc": acc, "num_fewshot": shots, "limit": limit}
    return metrics if acc_norm is None else {**metrics, "acc_norm": acc_norm}


def record(folder, model, stage, tokens, tasks):
    """One results file as llmhift.evaluate (or the training callback) writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {"model": str(model), "stage": stage, "tokens": tokens, "batch": None if tokens is None else tokens // 100,
            "harness": "lm-eval 0.4.13", "tasks": tasks}
    (folder / RESULTS_NAME).write_text(json.dumps(body))
    return body


def table(text):
    """The downstream table of report.md as rows of cells (header first, the --- line dropped)."""
    section = text[text.index("## Downstream evaluation"):]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows if not row.startswith("| ---")]


@pytest.fixture
def pipeline(tmp_path):
    """Records of every stage, written out of order, one of them outside the run folder."""
    root, ck = tmp_path / "runs", tmp_path / "runs" / "continue" / "checkpoints"
    record(root / "continue" / "evals" / "b2", ck / "ep0-ba20-rank0.pt", "checkpoint", 2000,
           {"piqa": task(0.60, 0.62), "sciq": task(0.70, limit=50)})
    record(root / "evals" / "tuned", tmp_path / "tuned", "finetuned", None, {"piqa": task(0.66, 0.67), "sciq": task(0.80)})
    record(root / "evals" / "pruned", ck.parent / "pruned-latest-rank0.pt", "pruned", None,
           {"piqa": task(0.50, 0.51), "sciq": task(0.55)})
    record(ck / "downstream" / "ba10", ck / "ep0-ba10-rank0.pt", "checkpoint", 1000,
           {"piqa": task(0.55, 0.58), "sciq": task(0.65, limit=50)})
    record(root / "evals" / "end", ck / "latest-rank0.pt", "continued", 3000, {"piqa": task(0.64, 0.66), "sciq": task(0.75)})
    record(tmp_path / "source_eval", tmp_path / "hf", "source", None,
           {"piqa": task(0.70, 0.71), "sciq": task(0.90), "arc_challenge": task(0.25, 0.30, shots=25)})
    return root, tmp_path / "source_eval", ck


def test_table_has_one_column_per_record_in_stage_then_token_order(pipeline, capsys):
    root, source, ck = pipeline
    assert main([str(root), "--downstream", str(source)]) == 0
    assert capsys.readouterr().err == ""
    text = (root / "report" / "report.md").read_text()
    rows = table(text)
    assert rows[0] == ["task", "1. source", "2. pruned", "3. checkpoint @ 1,000 tokens", "4. checkpoint @ 2,000 tokens",
                       "5. continued @ 3,000 tokens", "6. finetuned"]
    assert rows[1:] == [
        ["arc_challenge (25-shot)", "25.0", "-", "-", "-", "-", "-"],  # only the source has it
        ["arc_challenge (25-shot, acc_norm)", "30.0", "-", "-", "-", "-", "-"],
        ["piqa (0-shot)", "70.0", "50.0", "55.0", "60.0", "64.0", "66.0"],
        ["piqa (0-shot, acc_norm)", "71.0", "51.0", "58.0", "62.0", "66.0", "67.0"],
        ["sciq (0-shot)", "90.0", "55.0", "65.0", "70.0", "75.0", "80.0"],
        ["**average acc, 2 tasks**", "80.0", "52.5", "60.0", "65.0", "69.5", "73.0"],  # piqa and sciq: in every column
    ]
    assert "\n3. `" + str(ck / "ep0-ba10-rank0.pt") + "` (checkpoint, lm-eval 0.4.13, at most 50 examples per task)" in text
    assert "\n6. `" + str(source.parent / "tuned") + "` (finetuned, lm-eval 0.4.13)" in text
    assert "paper:" not in text  # two tasks are not the paper's suite: its averages are not comparable
    assert "![downstream_accuracy_1](downstream_accuracy_1.png)" in text
    assert (root / "report" / "downstream_accuracy_1.png").stat().st_size > 1000
    assert not (root / "report" / "downstream_accuracy_2.png").exists()  # one run has several checkpoints


def test_accuracy_series_holds_one_line_per_task_with_each_checkpoint(pipeline):
    root, source, ck = pipeline
    records = [json.loads(p.read_text()) for p in sorted({*root.rglob(RESULTS_NAME), *source.rglob(RESULTS_NAME)})]
    ordered = order_records(records)
    assert [(r["stage"], r["tokens"]) for r in ordered] == [("source", None), ("pruned", None), ("checkpoint", 1000),
                                                            ("checkpoint", 2000), ("continued", 3000), ("finetuned", None)]
    series = accuracy_series(ordered)
    assert series == {ck: {"piqa": {1000: 0.55, 2000: 0.60, 3000: 0.64}, "sciq": {1000: 0.65, 2000: 0.70, 3000: 0.75}}}
    fig = plot_accuracy(ck, series[ck])
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].get_lines()}
    assert lines == {"piqa": ([1000, 2000, 3000], [0.55, 0.60, 0.64]), "sciq": ([1000, 2000, 3000], [0.65, 0.70, 0.75])}


def test_a_single_checkpoint_has_no_curve(tmp_path):
    record(tmp_path / "a", tmp_path / "ck" / "ep0-ba10-rank0.pt", "checkpoint", 1000, {"piqa": task(0.5)})
    record(tmp_path / "b", tmp_path / "other" / "ep0-ba20-rank0.pt", "checkpoint", 2000, {"piqa": task(0.6)})
    assert accuracy_series(order_records([json.loads(p.read_text()) for p in tmp_path.rglob(RESULTS_NAME)])) == {}


def test_paper_averages_join_when_the_records_cover_the_paper_suite(tmp_path):
    names = [spec.name for spec in SUITES["sheared_llama"]]
    accs = {name: 0.40 + 0.01 * i for i, name in enumerate(names)}
    record(tmp_path / "runs" / "e", tmp_path / "hf", "source", None, {n: task(a) for n, a in accs.items()})
    assert main([str(tmp_path / "runs")]) == 0
    rows = table((tmp_path / "runs" / "report" / "report.md").read_text())
    assert rows[0] == ["task", "1. source", *(f"paper: {name}" for name in PAPER_AVERAGE)]
    assert rows[-1] == [f"**average acc, {len(names)} tasks**", f"{100 * sum(accs.values()) / len(accs):.1f}",
                        "51.0", "48.9", "56.7", "55.7"]
    assert all(row[2:] == ["-"] * 4 for row in rows[1:-1])  # no per-task figure is recorded for the paper


def test_no_records_no_downstream_section(tmp_path):
    logger = JsonlLogger(str(tmp_path / "run" / "metrics.jsonl"))
    logger.log_metrics({"loss/train/total": 3.0}, step=1)
    logger.close(None, None)
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## run" in text and "Downstream" not in text
    assert not list((tmp_path / "report").glob("downstream_*"))


def test_a_missing_downstream_path_is_one_line(tmp_path, capsys):
    record(tmp_path / "e", tmp_path / "hf", "source", None, {"piqa": task(0.5)})
    assert main([str(tmp_path), "--downstream", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --downstream {tmp_path / 'nowhere'}: does not exist") and err.count("\n") == 1
    assert not (tmp_path / "report").exists()
