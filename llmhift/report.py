"""Plots and a markdown summary of llmhift runs from their metrics.jsonl, and a downstream table from their
downstream.json records: ``python -m llmhift.report RUN_DIR [--downstream PATH ...]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from llmhift.atomic import atomic_directory  # noqa: E402
from llmhift.callbacks.dynamic_loading import PROPORTION_KEY  # noqa: E402
from llmhift.callbacks.hift.callback import ACTIVE_GROUP_KEY as HIFT_GROUP  # noqa: E402
from llmhift.callbacks.pruning import (  # noqa: E402
    EXPECTED_PARAMS_KEY,
    EXPECTED_SPARSITY_KEY,
    LM_LOSS,
    TARGET_PARAMS_KEY,
    TARGET_SPARSITY_KEY,
)
from llmhift.callbacks.task_balance import TASK_WEIGHT_KEY, TRAIN_TASK_LOSS_KEY  # noqa: E402
from llmhift.downstream import RESULTS_NAME, STAGES, SUITES, read_results  # noqa: E402
from llmhift.errors import cli_errors  # noqa: E402
from llmhift.loggers import THROUGHPUT_KEY, TRAIN_LOSS_KEY, metric_key  # noqa: E402
from llmhift.models.causal_lm import CE_METRIC  # noqa: E402
from llmhift.models.metrics import DOMAIN_METRIC_SUFFIX  # noqa: E402
from llmhift.paper_results import PAPER_AVERAGE  # noqa: E402

__all__ = ["Series", "read_metrics", "read_metrics_skipping", "find_runs", "plot_run", "find_downstream",
           "order_records", "downstream_table", "accuracy_series", "plot_accuracy", "write_report", "main"]

Series = dict[str, dict[int, float]]  # metric key -> {batch: value}
# What the report reads, each named by the module that logs it; a ``{}`` template matches one key per
# domain or mask.
EVAL_CE = metric_key(CE_METRIC)
DOMAIN_CE = metric_key("{}" + DOMAIN_METRIC_SUFFIX)
TOTAL_LOSS, LM_LOSS_KEY = TRAIN_LOSS_KEY.format("total"), TRAIN_LOSS_KEY.format(LM_LOSS)
REPORT_TITLE = "# llmhift run report"
COMMAND = "llmhift.report"  # the marker of a report folder: the only non-empty folder a report replaces


def _parse(line: str) -> tuple[int, dict[str, float]]:
    """One JsonlLogger line as (batch, {key: value}); ValueError for anything else."""
    record = json.loads(line)
    if not isinstance(record, dict) or "batch" not in record:
        raise ValueError("not a metrics record")
    batch = int(record.pop("batch") or 0)
    return batch, {key: float(value) for key, value in record.items() if value is not None}


def read_metrics_skipping(path: str | Path) -> tuple[Series, list[int]]:
    """Every metric of a JsonlLogger file, and the numbers of the lines that do not parse.

    A run killed mid-write (or stopped by a full disk) leaves a truncated last line; the lines
    before it are every metric up to the crash, so they are kept and the broken ones counted."""
    series: Series = {}
    skipped = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            batch, values = _parse(line)
        except (ValueError, TypeError):  # JSONDecodeError is a ValueError
            skipped.append(number)
            continue
        for key, value in values.items():
            series.setdefault(key, {})[batch] = value
    return series, skipped


def read_metrics(path: str | Path) -> Series:
    """Every metric of a JsonlLogger file; the last value logged at a batch wins (a resumed run's)."""
    return read_metrics_skipping(path)[0]


def find_runs(root: str | Path) -> dict[str, Path]:
    """Run name -> metrics.jsonl for every run under ``root``, in the order the runs started. The name
    is the run's folder (the folder above a ``checkpoints`` folder) relative to ``root``, so that
    ``teamA/ck`` and ``teamB/ck`` stay two runs; ``root``'s own name when the run is ``root``."""
    root = Path(root)
    files = sorted(root.rglob("metrics.jsonl"), key=lambda p: p.stat().st_ctime)
    runs = {}
    for path in files:
        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        name = folder.relative_to(root).as_posix()
        runs[root.resolve().name if name == "." else name] = path
    return runs


def _stems(names: Sequence[str]) -> dict[str, str]:
    """Run name -> the start of its PNG files' names, unique among ``names``.

    Names are relative paths and a file name holds no ``/``: ``teamA/ck`` reads ``teamA_ck``, which a
    run folder named ``teamA_ck`` reads too. The later of two such runs gets ``-2`` (``-3``, ...) rather
    than overwriting the other's plots; a suffix another run's own stem already has is skipped."""
    wanted = {name: name.replace("/", "_") for name in names}
    taken: set[str] = set()
    stems = {}
    for name, stem in wanted.items():
        unique, n = stem, 1
        while unique in taken or (unique != stem and unique in wanted.values()):
            n += 1
            unique = f"{stem}-{n}"
        taken.add(unique)
        stems[name] = unique
    return stems


def _xy(points: dict[int, float]) -> tuple[list[int], list[float]]:
    batches = sorted(points)
    return batches, [points[b] for b in batches]


def _matching(series: Series, template: str) -> dict[str, dict[int, float]]:
    """{domain: points} for the keys that fill the ``{}`` of ``template`` (``metrics/train/{}_weight``)."""
    prefix, suffix = template.split("{}")
    return {k[len(prefix) : len(k) - len(suffix)]: v for k, v in sorted(series.items())
            if k.startswith(prefix) and k.endswith(suffix) and len(k) > len(prefix) + len(suffix)}


def _domain_losses(series: Series) -> dict[str, dict[int, float]]:
    """Per-domain eval loss; a domain absent from the evaluated batches logs exactly 0, which is no loss."""
    domains = _matching(series, DOMAIN_CE)
    kept = {d: {b: v for b, v in points.items() if v > 0} for d, points in domains.items()}
    return {d: points for d, points in kept.items() if points}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_loss(name: str, series: Series) -> plt.Figure | None:
    domains = _domain_losses(series)
    if TOTAL_LOSS not in series and not domains:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lm_key = LM_LOSS_KEY if LM_LOSS_KEY in series else TOTAL_LOSS
    if lm_key in series:
        ax.plot(*_xy(series[lm_key]), color="0.6", linewidth=1, label="train (all domains)")
    for domain, points in domains.items():
        ax.plot(*_xy(points), marker="o", linewidth=2, label=f"eval: {domain}")
    if EVAL_CE in series:
        ax.plot(*_xy(series[EVAL_CE]), "k--", marker="s", label="eval: all")
    ax.set(title=f"{name}: language-model loss per domain", xlabel="batch", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_proportions(name: str, series: Series) -> plt.Figure | None:
    weights = _matching(series, PROPORTION_KEY)
    if not weights:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for domain, points in weights.items():
        ax.step(*_xy(points), where="post", linewidth=2, label=domain)
    ax.set(title=f"{name}: training-mix proportion per domain (dynamic batch loading)", xlabel="batch",
           ylabel="proportion", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_tasks(name: str, series: Series) -> plt.Figure | None:
    """Multi-task runs: each task's train loss per batch and, with ``self_paced``, its loss weight."""
    losses, weights = _matching(series, TRAIN_TASK_LOSS_KEY), _matching(series, TASK_WEIGHT_KEY)
    if not losses:
        return None
    fig, axes = plt.subplots(1, 2 if weights else 1, figsize=(12 if weights else 8, 4.5), squeeze=False)
    for task, points in losses.items():
        axes[0, 0].plot(*_xy(points), linewidth=1.5, label=task)
    axes[0, 0].set(title=f"{name}: train loss per task", xlabel="batch", ylabel="cross-entropy (nats/token)")
    for task, points in weights.items():
        axes[0, 1].step(*_xy(points), where="post", linewidth=2, label=task)
    if weights:
        axes[0, 1].set(title="self-paced task weight in the loss", xlabel="batch", ylabel="weight", ylim=(0, 1))
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _plot_pruning(name: str, series: Series) -> plt.Figure | None:
    if EXPECTED_PARAMS_KEY not in series:
        return None
    fig, (params, sparsity) = plt.subplots(1, 2, figsize=(12, 4.5))
    params.plot(*_xy(series[EXPECTED_PARAMS_KEY]), linewidth=2, label="expected (L0 masks)")
    params.plot(*_xy(series[TARGET_PARAMS_KEY]), "k--", label="target")
    params.set(title=f"{name}: non-embedding parameters", xlabel="batch", ylabel="parameters")
    params.grid(alpha=0.3)
    params.legend(fontsize=8)
    targets = _matching(series, TARGET_SPARSITY_KEY)
    for index, (module, points) in enumerate(_matching(series, EXPECTED_SPARSITY_KEY).items()):
        color = f"C{index}"
        sparsity.plot(*_xy(points), color=color, linewidth=2, label=f"{module}: expected")
        if module in targets:
            sparsity.plot(*_xy(targets[module]), color=color, linestyle="--", label=f"{module}: target")
    sparsity.set(title=f"{name}: sparsity per structure vs target", xlabel="batch", ylabel="sparsity", ylim=(0, 1))
    sparsity.grid(alpha=0.3)
    sparsity.legend(fontsize=7, ncol=2)
    return fig


def _plot_hift(name: str, series: Series) -> plt.Figure | None:
    if HIFT_GROUP not in series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    batches, groups = _xy(series[HIFT_GROUP])
    ax.step(batches, groups, where="post", color="C1", linewidth=2, label="active group")
    ax.scatter(batches, groups, c=groups, cmap="viridis", zorder=3, label="optimizer step")
    ax.set(title=f"{name}: HiFT group trained at each step", xlabel="batch", ylabel="group index")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_throughput(name: str, series: Series) -> plt.Figure | None:
    if THROUGHPUT_KEY not in series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_xy(series[THROUGHPUT_KEY]), color="C2", linewidth=2, label="tokens/s (all ranks)")
    ax.set(title=f"{name}: training throughput", xlabel="batch", ylabel="tokens per second")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_run(name: str, series: Series, out: Path, stem: str | None = None) -> list[Path]:
    """Every plot the run's metrics allow, as PNGs ``<stem>_<kind>.png`` in ``out``; ``stem`` defaults
    to the name with ``/`` as ``_`` (:func:`write_report` gives each run a unique one)."""
    stem = stem if stem is not None else _stems([name])[name]
    plots = {"loss": _plot_loss, "proportions": _plot_proportions, "pruning": _plot_pruning, "hift": _plot_hift,
             "throughput": _plot_throughput, "tasks": _plot_tasks}
    return [_save(fig, out / f"{stem}_{kind}.png") for kind, plot in plots.items()
            if (fig := plot(name, series)) is not None]


def _last(points: dict[int, float]) -> float:
    return points[max(points)]


def _summary(name: str, series: Series, pngs: list[Path]) -> list[str]:
    lines = [f"## {name}", ""]
    batches = max((max(points) for points in series.values()), default=0)
    lines.append(f"- batches: {batches}")
    for key, label in ((TOTAL_LOSS, "final train loss"), (EVAL_CE, "final eval loss")):
        if key in series:
            lines.append(f"- {label}: {_last(series[key]):.3f}")
    domains = _domain_losses(series)
    if domains:
        lines.append("- final eval loss per domain: " + ", ".join(f"{d} {_last(p):.3f}" for d, p in domains.items()))
    weights = _matching(series, PROPORTION_KEY)
    if weights:
        lines.append("- proportions first -> last: " + ", ".join(
            f"{d} {p[min(p)]:.3f} -> {_last(p):.3f}" for d, p in weights.items()))
    if EXPECTED_PARAMS_KEY in series:
        lines.append(f"- expected params at the end: {_last(series[EXPECTED_PARAMS_KEY]):,.0f} "
                     f"(target {_last(series[TARGET_PARAMS_KEY]):,.0f})")
        targets = _matching(series, TARGET_SPARSITY_KEY)
        lines.append("- sparsity expected / target: " + ", ".join(
            f"{m} {_last(p):.3f} / {_last(targets[m]):.3f}"
            for m, p in _matching(series, EXPECTED_SPARSITY_KEY).items() if m in targets))
    if HIFT_GROUP in series:
        groups = sorted({int(g) for g in series[HIFT_GROUP].values()})
        lines.append(f"- HiFT groups trained: {groups}")
    if THROUGHPUT_KEY in series:
        values = list(series[THROUGHPUT_KEY].values())
        lines.append(f"- throughput: mean {sum(values) / len(values):,.0f} tokens/s")
    lines.append("")
    lines += [f"![{png.stem}]({png.name})" for png in pngs]
    lines.append("")
    return lines


# Downstream columns left to right: the model a run starts from, what pruning made, training's own
# checkpoints, the end of continued pretraining, the fine-tuned model; fewer training tokens first.
CURVE_STAGES = ("checkpoint", "continued")  # the points of a run's accuracy-against-tokens curve
PAPER_SUITE = "sheared_llama"  # the suite PAPER_AVERAGE is the average of
Record = dict[str, Any]  # one downstream.json (llmhift.downstream.read_results)


def find_downstream(paths: Iterable[str | Path]) -> list[Path]:
    """Every downstream results file given (a file) or found below a given folder, each once, sorted."""
    found = set()
    for path in map(Path, paths):
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.resolve() for p in path.rglob(RESULTS_NAME))
        else:
            raise FileNotFoundError(f"--downstream {path}: does not exist; give a {RESULTS_NAME} or a folder "
                                    "holding some (python -m llmhift.evaluate ... --out writes them)")
    return sorted(found)


def order_records(records: Iterable[Record]) -> list[Record]:
    """Records in column order: by stage (:data:`STAGES`), then training tokens (unknown first),
    then the evaluated model's path."""
    def key(record: Record) -> tuple[int, int, str]:
        stage = STAGES.index(record["stage"]) if record["stage"] in STAGES else len(STAGES)
        return stage, -1 if record["tokens"] is None else record["tokens"], record["model"]
    return sorted(records, key=key)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _row(label: str, cells: Iterable[str]) -> str:
    return "| " + " | ".join([label, *cells]) + " |"


def _shots(task: str, records: Sequence[Record]) -> str:
    shots = sorted({r["tasks"][task]["num_fewshot"] for r in records if task in r["tasks"]})
    return "/".join(map(str, shots)) + "-shot"


def downstream_table(records: Sequence[Record]) -> list[str]:
    """Markdown lines: one column per record, in the order given; one row per task's ``acc`` (and its
    ``acc_norm`` where a record has one), in percent; the mean ``acc`` over the tasks every column has;
    and the paper's averages as reference columns when that mean covers the paper's whole suite (an
    average over other tasks is not comparable with them). A task a record lacks reads ``-``."""
    tasks = sorted({task for r in records for task in r["tasks"]})
    common = [task for task in tasks if all(task in r["tasks"] for r in records)]
    suite = {spec.name for spec in SUITES[PAPER_SUITE]}
    reference = PAPER_AVERAGE if suite <= set(common) else {}
    columns = [f"{i}. {r['stage']}" + (f" @ {r['tokens']:,} tokens" if r["tokens"] is not None else "")
               for i, r in enumerate(records, start=1)]
    lines = [_row("task", [*columns, *(f"paper: {name}" for name in reference)]),
             _row("---", ["---:"] * (len(columns) + len(reference)))]
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            values = [r["tasks"].get(task, {}).get(metric) for r in records]
            if metric == "acc" or any(v is not None for v in values):
                label = f"{task} ({_shots(task, records)}{', acc_norm' if metric == 'acc_norm' else ''})"
                lines.append(_row(label, [*map(_percent, values), *["-"] * len(reference)]))
    if common:
        means = [sum(r["tasks"][task]["acc"] for task in common) / len(common) for r in records]
        lines.append(_row(f"**average acc, {len(common)} tasks**",
                          [*map(_percent, means), *(f"{value:.1f}" for value in reference.values())]))
    lines.append("")
    for i, record in enumerate(records, start=1):
        limits = {t["limit"] for t in record["tasks"].values()} - {None}
        limited = f", at most {max(limits)} examples per task" if limits else ""
        lines.append(f"{i}. `{record['model']}` ({record['stage']}, {record['harness']}{limited})")
    if reference:
        lines.append(f"\nPaper columns: Sheared-LLaMA's averages over its downstream suite (`--tasks {PAPER_SUITE}`); "
                     "its per-task figures are not recorded here (llmhift/paper_results.py).")
    else:
        lines.append(f"\nThe paper's averages are shown beside an average over its whole suite (`--tasks {PAPER_SUITE}`) "
                     "in every column.")
    return lines


def accuracy_series(records: Iterable[Record]) -> dict[Path, dict[str, dict[int, float]]]:
    """Each task's ``acc`` by training tokens, per run: the folder holding the evaluated checkpoints (or,
    for records a DownstreamEvalCallback wrote, the save folder its checkpoints go to). Only runs with
    two or more token counts have a curve; a later record at the same tokens wins."""
    runs: dict[Path, dict[str, dict[int, float]]] = {}
    for record in records:
        if record["stage"] in CURVE_STAGES and record["tokens"] is not None:
            tasks = runs.setdefault(Path(record["model"]).parent, {})
            for task, metrics in record["tasks"].items():
                tasks.setdefault(task, {})[record["tokens"]] = metrics["acc"]
    return {run: tasks for run, tasks in runs.items() if len({t for p in tasks.values() for t in p}) > 1}


def plot_accuracy(run: Path, series: dict[str, dict[int, float]]) -> plt.Figure:
    """One line per task: its accuracy at each evaluated checkpoint of ``run``, against training tokens."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for task, points in sorted(series.items()):
        ax.plot(*_xy(points), marker="o", linewidth=2, label=task)
    ax.set(title=f"{run.parent.name}/{run.name}: downstream accuracy per task", xlabel="training tokens",
           ylabel="accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _downstream_section(paths: Sequence[Path], out: Path) -> list[str]:
    """The report's downstream table and, per run with several evaluated checkpoints, its plot in ``out``."""
    records = order_records(read_results(path) for path in paths)
    lines = ["## Downstream evaluation", "", *downstream_table(records), ""]
    for number, (run, series) in enumerate(accuracy_series(records).items(), start=1):
        png = _save(plot_accuracy(run, series), out / f"downstream_accuracy_{number}.png")
        lines += [f"![{png.stem}]({png.name})", ""]
    return lines


def _old_report(folder: Path) -> bool:
    """A report written before output markers: report.md under the report's own title, and PNGs only,
    which proves its origin (a user's folder of figures with some other report.md is not one)."""
    files = list(folder.iterdir()) if folder.is_dir() else []
    report_md = folder / "report.md"
    if not report_md.is_file() or not report_md.read_text(errors="replace").startswith(REPORT_TITLE):
        return False
    return all(f.is_file() and (f.name == "report.md" or f.suffix == ".png") for f in files)


def write_report(root: str | Path, out: str | Path | None = None, downstream: Sequence[str | Path] = ()) -> Path:
    """Plots and ``report.md`` for every run under ``root``, into ``out`` (``<root>/report``), atomically;
    with a downstream table of every results file under ``root`` and in ``downstream`` (files or folders)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a folder; give the folder that holds the runs "
                                "(a save_folder, or a folder above several)")
    runs = find_runs(root)
    evaluations = find_downstream([root, *downstream])
    if not runs and not evaluations:
        raise FileNotFoundError(f"{root}: no metrics.jsonl (nor {RESULTS_NAME}) below it; add `loggers: {{jsonl: {{path: "
                                "${save_folder}/metrics.jsonl}}}` to the run's yaml")
    out = Path(out) if out is not None else Path(root) / "report"
    # Its own previous report is refreshed without a flag; anything else in `out` is refused.
    with atomic_directory(out, overwrite=True, command=COMMAND, inputs=[*runs.values(), *evaluations],
                          own=_old_report) as tmp:
        lines = [REPORT_TITLE, "", f"Runs under `{root}`, in the order they started.", ""]
        stems = _stems(list(runs))
        for name, path in runs.items():
            series, skipped = read_metrics_skipping(path)
            summary = _summary(name, series, plot_run(name, series, tmp, stems[name]))
            if skipped:
                note = f"{path}: skipped {len(skipped)} unparsable line(s) (line {', '.join(map(str, skipped[:5]))})"
                print(f"note: {note}; a run killed mid-write leaves its last line cut", file=sys.stderr)
                summary.insert(2, f"- {note}")  # under the run's heading
            lines += summary
        if evaluations:
            lines += _downstream_section(evaluations, tmp)
        (tmp / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


@cli_errors(OSError)  # FileNotFoundError included
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmhift.report", description=__doc__)
    parser.add_argument("run_dir", help="a folder holding one or more runs' metrics.jsonl (searched recursively)")
    parser.add_argument("--out", help="a new folder, or a previous report's, for the plots and report.md "
                        "(default RUN_DIR/report)")
    parser.add_argument("--downstream", nargs="+", default=[], metavar="PATH",
                        help=f"{RESULTS_NAME} files, or folders searched for them, beside those under RUN_DIR "
                        "(python -m llmhift.evaluate's --out folders): one table column each")
    args = parser.parse_args(argv)
    print(f"report: {write_report(args.run_dir, args.out, args.downstream)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
