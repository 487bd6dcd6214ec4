"""Downstream accuracy of a model with EleutherAI's lm-evaluation-harness, and its results file.

Perplexity says little about what pruning costs: Sheared-LLaMA's claim is a downstream average over a
fixed task list (the Sheared-LLaMA paper's downstream table). This module runs that list (or any harness task) on a
``transformers`` model object already in memory, so an evaluation command, a training callback and a
report all share one runner and one results format (:data:`RESULTS_NAME`, read back by
:func:`read_results`). It loads nothing from llmhift's model or data layers: the caller hands it a
``PreTrainedModel`` and its tokenizer.

``lm-eval`` is an optional extra (``pip install 'llmhift[eval]'``); it is imported only when a task is
resolved or run. Offline: the harness reads datasets through ``datasets``, so ``HF_DATASETS_OFFLINE=1``
with a filled ``HF_DATASETS_CACHE`` (or task yamls pointing at local files, via ``include_path``)
runs without a network; a task whose data is missing raises one :class:`~llmhift.errors.UserError`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from llmhift.atomic import atomic_file, check_destination
from llmhift.errors import ConfigError, UserError

__all__ = [
    "RESULTS_NAME",
    "TABLE_NAME",
    "STAGES",
    "SUITES",
    "INSTALL_HINT",
    "TaskSpec",
    "harness_version",
    "expand_tasks",
    "evaluate_model",
    "check_limit",
    "check_out",
    "write_results",
    "read_results",
]

RESULTS_NAME = "downstream.json"  # one record per evaluated model, in its --out folder
TABLE_NAME = "downstream.md"  # the same record as a markdown table, beside it
STAGES = ("source", "pruned", "checkpoint", "continued", "finetuned")  # pipeline order: the report's columns
INSTALL_HINT = "pip install 'llmhift[eval]'"
COMMAND = "llmhift.downstream"  # the writer that may replace its own results files
_TABLE_TITLE = "# Downstream evaluation"


@dataclass(frozen=True)
class TaskSpec:
    """One harness task (or group, such as ``mmlu``) and the number of in-context examples it gets."""

    name: str
    num_fewshot: int = 0


# Sheared-LLaMA's evaluation (paper section 3.1 and its appendix): the harness' names for its tasks
# and the shots it used; the rest are zero-shot.
SUITES: dict[str, tuple[TaskSpec, ...]] = {
    "sheared_llama": (
        TaskSpec("arc_easy"),
        TaskSpec("arc_challenge", 25),
        TaskSpec("hellaswag", 10),
        TaskSpec("piqa"),
        TaskSpec("winogrande"),
        TaskSpec("sciq"),
        TaskSpec("logiqa"),
        TaskSpec("boolq", 32),
        TaskSpec("lambada_openai"),
        TaskSpec("nq_open", 32),
        TaskSpec("mmlu", 5),
    ),
}

# Where the suite's tasks live under lm_eval/tasks: indexing only these folders takes about a second,
# indexing all ~14,000 built-in yamls about 40 s (measured on this project's CI machine), so the full
# index is built only for a task outside this table.
_HARNESS_FOLDERS = {
    "arc_easy": "arc", "arc_challenge": "arc", "hellaswag": "hellaswag", "piqa": "piqa",
    "winogrande": "winogrande", "sciq": "sciq", "logiqa": "logiqa", "boolq": "super_glue/boolq",
    "lambada_openai": "lambada", "nq_open": "nq_open", "mmlu": "mmlu/default",
}
# The metric recorded as a task's accuracy: multiple choice reports acc (and acc_norm, normalised by
# the choice's length); a generative task such as NQ reports exact match, which the paper counts as
# its accuracy.
_ACC_METRICS = ("acc", "exact_match")


def harness_version() -> str:
    """``lm-eval <version>`` of the installed harness; a UserError naming the extra when it is missing."""
    try:
        return f"lm-eval {metadata.version('lm-eval')}"
    except metadata.PackageNotFoundError:
        raise UserError(f"lm-eval (lm-evaluation-harness) is not installed; {INSTALL_HINT}") from None


def _task_index(names: tuple[str, ...], include_path: str | None) -> Any:
    """A harness TaskManager that knows every name (the small index when it suffices), or ConfigError."""
    harness_version()
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    builtin = Path(lm_eval.tasks.__file__).parent
    # Built-in folders first: a later include path overrides them, so a user's yaml of the same name wins.
    paths = sorted({str(builtin / _HARNESS_FOLDERS[n]) for n in names if n in _HARNESS_FOLDERS})
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path {include_path} is not a folder; give the folder of your task yamls")
        paths.append(str(Path(include_path).absolute()))
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    missing = [n for n in names if manager is None or n not in manager.all_tasks]
    # A name that no built-in yaml even mentions is unknown: say so in a second, not after the full index.
    if missing and not _mentioned(builtin, missing):
        unknown = missing
    else:
        manager = TaskManager(include_path=include_path) if missing else manager
        unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks: unknown task {', '.join(unknown)} (not a suite ({', '.join(SUITES)}) nor a task of "
            f"{harness_version()}{' or of ' + include_path if include_path else ''}); "
            "see `lm_eval ls tasks`, or put its yaml in a folder given as --include-path"
        )
    return manager


def _mentioned(root: Path, names: list[str]) -> bool:
    """Whether any yaml under ``root`` contains one of ``names`` as a whole word."""
    words = re.compile("|".join(rf"(?<![\w.-]){re.escape(n)}(?![\w.-])" for n in names))
    return any(words.search(p.read_text(errors="replace")) for p in root.rglob("*.yaml"))


@functools.lru_cache(maxsize=4)
def _cached_index(names: tuple[str, ...], include_path: str | None) -> Any:
    return _task_index(names, include_path)


def expand_tasks(
    names: Sequence[str], num_fewshot: int | None = None, *, include_path: str | None = None
) -> list[TaskSpec]:
    """The tasks that ``names`` stand for: a suite expands to its tasks and shots, any other name is a
    harness task (zero-shot). ``num_fewshot`` overrides every task's shots. Unknown names raise one
    ConfigError naming them, checked against the harness' task index (and ``include_path``'s yamls)."""
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot} is negative; give 0 or more in-context examples")
    specs: list[TaskSpec] = []
    for name in names:
        for spec in SUITES.get(name, (TaskSpec(name),)):
            if num_fewshot is not None:
                spec = TaskSpec(spec.name, num_fewshot)
            if spec.name not in (s.name for s in specs):
                specs.append(spec)
    if not specs:
        raise ConfigError(f"--tasks is empty; name a suite ({', '.join(SUITES)}) or harness tasks")
    _cached_index(tuple(s.name for s in specs), include_path)
    return specs


def _load(manager: Any, spec: TaskSpec) -> Any:
    """The harness task (or group) object of ``spec`` with its shots set; UserError when its data is absent."""
    try:
        loaded = manager.load([spec.name])
    except OSError as err:  # ConnectionError (offline, no cache), FileNotFoundError (a local file missing)
        raise UserError(
            f"task {spec.name}: its dataset is not available ({str(err).splitlines()[0] if str(err) else err!r}); "
            "download it on a connected machine with the same lm-eval and datasets versions and copy "
            "HF_DATASETS_CACHE here, or point a task yaml at local files and pass its folder as --include-path"
        ) from None
    for leaf in loaded["tasks"].values():
        metrics = [m["metric"] for m in leaf.config.metric_list or ()]
        if not any(m in metrics for m in _ACC_METRICS):
            raise ConfigError(
                f"--tasks {spec.name}: task {leaf.config.task} reports no accuracy (metrics {metrics}); "
                f"choose a task that reports {' or '.join(_ACC_METRICS)}"
            )
        leaf.set_config(key="num_fewshot", value=spec.num_fewshot)
    return loaded["groups"].get(spec.name) or loaded["tasks"][spec.name]


def _metric(values: dict[str, Any], name: str) -> float | None:
    """The harness reports ``<metric>,<filter>``; the first filter's value, or None."""
    for key, value in values.items():
        if key.split(",")[0] == name and not isinstance(value, str):
            return float(value)
    return None


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[TaskSpec],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    include_path: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs the harness on ``model`` (a causal ``PreTrainedModel``, used as is: moved to ``device`` and
    put in eval mode for the run, its training mode restored after) and returns, per task,
    ``{"acc", "acc_norm" (multiple choice only), "num_fewshot", "limit"}``.

    ``limit`` caps the documents per task (a quick look, not a comparable score). Every task's data is
    loaded before the model runs, so a missing dataset fails in one line before any compute.
    """
    harness_version()  # without the extra: the one-line install hint, not an ImportError
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_limit(limit)
    manager = _cached_index(tuple(s.name for s in tasks), include_path)
    objects = [_load(manager, spec) for spec in tasks]
    was_training = model.training
    model.to(device).eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            lm, tasks=objects, task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0,
        )
    finally:
        model.train(was_training)
    results: dict[str, dict[str, Any]] = {}
    for spec in tasks:
        values = out["results"][spec.name]
        acc = _metric(values, "acc")
        row: dict[str, Any] = {"acc": acc if acc is not None else _metric(values, "exact_match")}
        if (norm := _metric(values, "acc_norm")) is not None:
            row["acc_norm"] = norm
        row.update(num_fewshot=spec.num_fewshot, limit=limit)
        results[spec.name] = row
    return results


def _number(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and (kind is int or math.isfinite(value))


def _check(record: Any, where: str) -> dict:
    """``record`` if it has the results format, else UserError naming the first bad field."""
    def bad(field: str, want: str) -> UserError:
        return UserError(f"{where}: {field} should be {want}; rerun python -m llmhift.evaluate to rewrite it")

    if not isinstance(record, dict):
        raise bad("the record", "a JSON object")
    if not isinstance(record.get("model"), str):
        raise bad("model", "the evaluated path")
    if record.get("stage") not in STAGES:
        raise bad("stage", f"one of {', '.join(STAGES)}")
    for key in ("tokens", "batch"):
        if record.get(key) is not None and not _number(record.get(key), int):
            raise bad(key, "an integer or null")
    if not isinstance(record.get("harness"), str):
        raise bad("harness", "the lm-eval version")
    tasks = record.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise bad("tasks", "an object of tasks")
    for name, row in tasks.items():
        if not isinstance(row, dict) or not _number(row.get("acc"), float):
            raise bad(f"tasks.{name}.acc", "a number")
        if "acc_norm" in row and not _number(row["acc_norm"], float):
            raise bad(f"tasks.{name}.acc_norm", "a number")
        if not _number(row.get("num_fewshot"), int):
            raise bad(f"tasks.{name}.num_fewshot", "an integer")
        if row.get("limit") is not None and not _number(row["limit"], int):
            raise bad(f"tasks.{name}.limit", "an integer or null")
    return record


def read_results(path: Path) -> dict:
    """The record in a results file, validated; one-line UserError when it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not JSON ({err}); rerun python -m llmhift.evaluate to rewrite it") from None
    return _check(record, str(path))


def _is_results(path: Path) -> bool:
    try:
        read_results(path)
    except (UserError, OSError):
        return False
    return True


def _is_table(path: Path) -> bool:
    try:
        return path.read_text().startswith(_TABLE_TITLE)
    except (OSError, UnicodeDecodeError):
        return False


def _table(record: dict) -> str:
    tokens = "" if record["tokens"] is None else f", {record['tokens']:,} training tokens"
    lines = [
        _TABLE_TITLE, "",
        f"`{record['model']}` ({record['stage']}{tokens}), {record['harness']}", "",
        "| task | shots | acc | acc_norm | limit |", "|---|---:|---:|---:|---:|",
    ]
    for name, row in record["tasks"].items():
        norm = f"{row['acc_norm']:.4f}" if "acc_norm" in row else ""
        limit = "" if row["limit"] is None else str(row["limit"])
        lines.append(f"| {name} | {row['num_fewshot']} | {row['acc']:.4f} | {norm} | {limit} |")
    return "\n".join(lines) + "\n"


def check_limit(limit: int | None) -> None:
    """``--limit`` caps documents per task: a positive count or none."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be a positive number of documents per task")


def check_out(out_dir: Path) -> None:
    """Refuses, before any evaluation runs, an ``out_dir`` whose results files someone else wrote:
    finding out after hours of harness work, or after the JSON but not the table, would lose both."""
    check_destination(Path(out_dir) / RESULTS_NAME, True, COMMAND, _is_results)
    check_destination(Path(out_dir) / TABLE_NAME, True, COMMAND, _is_table)


def write_results(out_dir: Path, record: dict) -> Path:
    """Writes ``record`` to ``out_dir/downstream.json`` and its table to ``downstream.md`` (each whole or
    not at all, replacing only files this module wrote); refused when ``out_dir`` overlaps the
    evaluated model. Returns the JSON path."""
    record = _check(record, "results record")
    out_dir = Path(out_dir)
    path = out_dir / RESULTS_NAME
    inputs = (record["model"],)
    with atomic_file(path, overwrite=True, command=COMMAND, inputs=inputs, own=_is_results) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    with atomic_file(out_dir / TABLE_NAME, overwrite=True, command=COMMAND, inputs=inputs, own=_is_table) as tmp:
        tmp.write_text(_table(record))
    return path
