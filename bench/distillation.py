"""Continued pretraining of the demo's pruned model with distillation from its unpruned source vs LM-only.

    python bench/distillation.py --prepare tiny                  # build teacher + pruned student first (CPU)
    python bench/distillation.py --root demo_runs --batches 60   # after `make demo`

Both runs are ``train.py`` on yamls/demo/continue.yaml and yamls/demo/continue_distill.yaml (the same yaml
plus callbacks.distillation) with the same overrides: the same seed, student, data and token stream (one
evaluation at batch 0 and one at the end, so dynamic loading changes nothing in between). The JSON
reports the eval cross-entropy before and after N batches of each, per domain, which run ends lower
(whichever it is), and the training step time of each (``time/train`` over the batches after the
first two, eval excluded) with the ratio KD / LM-only, expected ~ 1 + teacher forward / student step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # scripts/demo_pipeline.py: the pipeline's own commands
from demo_pipeline import pipeline_commands  # noqa: E402

from llmhift.callbacks.distillation import DISTILL_KL, DISTILL_TEACHER_CE  # noqa: E402
from llmhift.errors import UserError, cli_errors  # noqa: E402
from llmhift.loggers import metric_key  # noqa: E402
from llmhift.models.metrics import DOMAIN_METRIC_SUFFIX  # noqa: E402
from llmhift.report import EVAL_CE, read_metrics  # noqa: E402

TIMED_FROM = 2  # batches left out of the step time (first-call overheads)


def _run(yaml: str, folder: Path, overrides: list[str]) -> dict[str, dict[int, float]]:
    command = [sys.executable, "train.py", yaml, f"save_folder={folder}", *overrides]
    if subprocess.run(command, cwd=REPO, stdout=sys.stderr).returncode != 0:  # stdout: the JSON alone
        raise SystemExit(f"error: {' '.join(command)} failed; see its output above")
    return read_metrics(folder / "metrics.jsonl")


@cli_errors()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="demo_runs", help="the demo pipeline's folder (default demo_runs)")
    parser.add_argument("--prepare", choices=("tiny", "demo"),
                        help="first run the pipeline's data, pretrain, prune and post-processing steps at this size")
    parser.add_argument("--batches", type=int, default=40, help="continued-pretraining batches of each run")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-batches", type=int, default=-1, help="eval batches per evaluation (default -1: all)")
    args = parser.parse_args()
    if args.batches <= TIMED_FROM:
        parser.error(f"--batches: must exceed {TIMED_FROM} (the batches left out of the step time)")
    root = Path(args.root).resolve()
    if args.prepare:
        for command in pipeline_commands(root, args.prepare, sys.executable)[:4]:
            if subprocess.run(command, cwd=REPO, stdout=sys.stderr).returncode != 0:
                raise SystemExit(f"error: {' '.join(command)} failed; see its output above")
    teacher = root / "demo-pretrain" / "checkpoints" / "latest-rank0.pt"
    student = root / "demo-prune" / "checkpoints" / "pruned-latest-rank0.pt"
    for path in (teacher, student):
        if not path.exists():
            raise UserError(f"{path} does not exist; run `make demo`, or this bench with --prepare tiny")
    overrides = [
        f"variables.data_root={root / 'data'}", f"variables.pruned_model={student}", f"variables.teacher={teacher}",
        f"max_duration={args.batches}ba", f"eval_interval={args.batches}ba", "eval_first=true",
        f"eval_subset_num_batches={args.eval_batches}", f"save_interval={args.batches}ba", "progress_bar=false",
        "console_log_interval=1000ba", f"callbacks.distillation.alpha={args.alpha}",
        f"callbacks.distillation.temperature={args.temperature}",
    ]  # fmt: skip
    lm_overrides = [o for o in overrides if not o.startswith(("callbacks.distillation", "variables.teacher"))]
    out = root / "bench-distillation"
    runs = {"lm_only": _run("yamls/demo/continue.yaml", out / "lm_only", lm_overrides),
            "kd": _run("yamls/demo/continue_distill.yaml", out / "kd", overrides)}

    def step_s(log: dict[str, dict[int, float]]) -> float:
        hours = log["time/train"]
        return (hours[args.batches] - hours[TIMED_FROM]) * 3600 / (args.batches - TIMED_FROM)

    eval_prefix = metric_key("")
    domains = sorted(k for k in runs["lm_only"] if k.startswith(eval_prefix) and k.endswith(DOMAIN_METRIC_SUFFIX))
    final = {name: log[EVAL_CE][args.batches] for name, log in runs.items()}
    steps = {name: step_s(log) for name, log in runs.items()}
    report = {
        "batches": args.batches,
        "tokens": int(runs["kd"]["time/token"][args.batches]),
        "teacher": str(teacher), "student": str(student), "alpha": args.alpha, "temperature": args.temperature,
        "eval_ce": {"start": runs["lm_only"][EVAL_CE][0], **final},
        "eval_ce_per_domain": {d.removeprefix(eval_prefix).removesuffix(DOMAIN_METRIC_SUFFIX):
                               {name: log[d].get(args.batches) for name, log in runs.items()} for d in domains},
        "lower_eval_ce": min(final, key=final.get),
        "kd_minus_lm_only": final["kd"] - final["lm_only"],
        "teacher_ce_last_batch": runs["kd"][DISTILL_TEACHER_CE][args.batches - 1],
        "kl_first_last_batch": [runs["kd"][DISTILL_KL][0], runs["kd"][DISTILL_KL][args.batches - 1]],
        "step_s": steps,
        "step_time_ratio_kd_over_lm_only": steps["kd"] / steps["lm_only"],
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
