"""What DownstreamEvalCallback costs a run: the demo pretraining with and without it, side by side.

    python bench/downstream_cost.py                      # demo data in demo_runs/data (built if missing)
    python bench/downstream_cost.py --batches 40 --interval 10 --limit 8

Both runs are ``train.py yamls/demo/pretrain.yaml`` with the same overrides (no checkpoints, no held-out
evaluation); the second adds ``callbacks.downstream`` on the local multiple-choice task of the tests
(``tests/choice_task.py``: 8 questions x 3 choices, so at most 24 harness requests per evaluation). The
JSON reports each run's wall time (the whole ``train.py`` process) and their ratio, the callback's own wall
time per evaluation (its logged ``downstream/seconds``), and that over the plain run's mean batch time
(SpeedMonitor's ``time/train`` / batches).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/choice_task.py: the local task the tests evaluate

from llmhift.callbacks.downstream import SECONDS_KEY  # noqa: E402
from llmhift.errors import cli_errors  # noqa: E402
from llmhift.report import read_metrics  # noqa: E402
from tests.choice_task import CHOICE_TASK, QUESTIONS, write_choice_task  # noqa: E402

TRAIN_TIME = "time/train"  # SpeedMonitor's training wall time so far (evaluations excluded), here in seconds


def _run(folder: Path, overrides: list[str]) -> tuple[float, dict[str, dict[int, float]]]:
    command = [sys.executable, "train.py", "yamls/demo/pretrain.yaml", f"save_folder={folder}", *overrides]
    start = time.perf_counter()
    if subprocess.run(command, cwd=REPO, stdout=sys.stderr).returncode != 0:  # stdout: the JSON alone
        raise SystemExit(f"error: {' '.join(command)} failed; see its output above")
    return time.perf_counter() - start, read_metrics(folder / "metrics.jsonl")


@cli_errors()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo_runs/data", help="the demo data folder (built if missing)")
    parser.add_argument("--batches", type=int, default=20, help="training batches of each run")
    parser.add_argument("--interval", type=int, default=10, help="batches between evaluations")
    parser.add_argument("--limit", type=int, default=len(QUESTIONS), help="questions per evaluation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_choice_task(Path(tmp) / "tasks")
        common = [f"variables.data_root={Path(args.data).absolute()}", f"max_duration={args.batches}ba",
                  f"eval_interval={args.batches + 1}ba", f"save_interval={args.batches + 1}ba",
                  "callbacks.speed_monitor.time_unit=seconds", "progress_bar=false", "log_to_console=false"]
        plain_s, plain = _run(Path(tmp) / "plain", common)
        callback = (f"callbacks.downstream={{tasks: [{CHOICE_TASK}], interval: {args.interval}ba, "
                    f"limit: {args.limit}, batch_size: 8, include_path: {tasks}}}")
        with_s, metrics = _run(Path(tmp) / "with", [*common, callback])
    evaluations = list(metrics[SECONDS_KEY].values())
    per_evaluation = sum(evaluations) / len(evaluations)
    train_s = plain[TRAIN_TIME]
    batch_s = train_s[max(train_s)] / args.batches
    print(json.dumps({
        "batches": args.batches, "evaluations": len(evaluations), "questions": args.limit,
        "requests_per_evaluation": args.limit * len(QUESTIONS[0][1]),
        "run_without_callback_s": round(plain_s, 2), "run_with_callback_s": round(with_s, 2),
        "run_ratio": round(with_s / plain_s, 3), "seconds_per_evaluation": round(per_evaluation, 2),
        "seconds_per_training_batch": round(batch_s, 3), "evaluation_over_training_batch": round(per_evaluation / batch_s, 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
