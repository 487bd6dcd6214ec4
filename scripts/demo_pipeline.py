"""The whole Sheared-LLaMA + HiFT pipeline in miniature on CPU: ``python scripts/demo_pipeline.py [--root DIR]``.

Every step is printed as the shell command it runs, so each can be copied and run on its own:
demo data -> pretrain a tiny LLaMA -> prune it with dynamic loading -> post-process to a dense model
-> continue pretraining with dynamic loading -> convert to Hugging Face -> HiFT instruction tuning
-> convert (and check its logits) -> generate with plain transformers -> the run report (``<root>/report/report.md``).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["pipeline_commands", "main"]

# Durations of `make demo` (`--size demo`): the pipeline took 343 s on 2 cores (README), 2-3 full evaluations a run.
DEMO = {
    "pretrain": ["max_duration=120ba", "eval_interval=40ba", "save_interval=120ba"],
    "prune": ["max_duration=100ba", "eval_interval=50ba", "save_interval=100ba",
              "model.l0_module.lagrangian_warmup_steps=20ba"],
    "continue": ["max_duration=80ba", "eval_interval=40ba", "save_interval=80ba"],
    "hift": ["max_duration=60ba", "eval_interval=60ba", "save_interval=60ba"],
}
# `--size tiny` (the acceptance test: about a minute of training).
TINY = {
    "pretrain": ["max_duration=24ba", "eval_interval=12ba", "save_interval=24ba", "global_train_batch_size=8",
                 "device_train_microbatch_size=8", "scheduler.t_warmup=4ba"],
    "prune": ["max_duration=30ba", "eval_interval=10ba", "save_interval=30ba", "global_train_batch_size=8",
              "device_train_microbatch_size=8", "scheduler.t_warmup=4ba",
              "model.l0_module.lagrangian_warmup_steps=10ba"],
    "continue": ["max_duration=20ba", "eval_interval=10ba", "save_interval=20ba", "global_train_batch_size=8",
                 "device_train_microbatch_size=8", "scheduler.t_warmup=4ba"],
    "hift": ["max_duration=10ba", "eval_interval=10ba", "save_interval=10ba", "global_train_batch_size=8",
             "device_train_microbatch_size=8"],
}
PROMPT = "def read_file(path):"


def pipeline_commands(root: str | Path = "demo_runs", size: str = "demo", python: str = "python") -> list[list[str]]:
    """The pipeline's shell commands, in order, for runs under ``root`` (``size``: demo or tiny)."""
    r = Path(root)
    data, instructions = r / "data", r / "instructions"
    ckpt = {step: r / f"demo-{step}" / "checkpoints" for step in TINY}
    pruned = ckpt["prune"] / "pruned-latest-rank0.pt"
    continued_hf, final_hf = r / "demo-continue" / "hf", r / "demo-hift" / "hf"

    def train(step: str, yaml: str, *overrides: str) -> list[str]:
        extra = TINY[step] + ["progress_bar=false"] if size == "tiny" else DEMO[step]
        return [python, "train.py", f"yamls/demo/{yaml}.yaml", f"variables.data_root={data}",
                f"variables.run_name=demo-{step}", f"save_folder={ckpt[step]}", *overrides, *extra]

    return [
        [python, "-m", "llmhift.datasets.demo_data", str(data)],
        train("pretrain", "pretrain"),
        train("prune", "prune", f"model.pretrained={ckpt['pretrain'] / 'latest-rank0.pt'}"),
        [python, "-m", "llmhift.convert.post_pruning", "prune_and_save_model",
         str(ckpt["prune"] / "latest-rank0.pt"), "overwrite=true"],
        train("continue", "continue", f"variables.pruned_model={pruned}"),
        [python, "-m", "llmhift.convert.composer_to_hf", "save_composer_to_hf", str(ckpt["continue"] / "latest-rank0.pt"),
         str(continued_hf), "overwrite=true"],
        train("hift", "hift_pruned", f"variables.hf_model={continued_hf}", f"variables.instructions={instructions}"),
        [python, "-m", "llmhift.convert.composer_to_hf", "save_composer_to_hf", str(ckpt["hift"] / "latest-rank0.pt"),
         str(final_hf), "overwrite=true"],
        [python, "-m", "llmhift.convert.compare_logits", str(final_hf), str(ckpt["hift"] / "latest-rank0.pt")],
        [python, "scripts/generate.py", str(final_hf), PROMPT],
        [python, "-m", "llmhift.report", str(r)],
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="demo_runs", help="folder for the data and every run (default demo_runs)")
    parser.add_argument("--size", choices=("demo", "tiny"), default="demo",
                        help="demo: what make demo runs; tiny: a short smoke run")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for step in TINY:  # a rerun starts its runs afresh (Composer refuses to overwrite checkpoints); data is kept
        shutil.rmtree(Path(args.root) / f"demo-{step}", ignore_errors=True)
    commands = pipeline_commands(args.root, args.size, sys.executable)
    for number, command in enumerate(commands, 1):
        print(f"\n[{number}/{len(commands)}] $ {shlex.join(['python', *command[1:]])}", flush=True)
        step_start = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            print(f"step {number} failed: {shlex.join(command)}", file=sys.stderr)
            return 1
        print(f"[{number}/{len(commands)}] done in {time.perf_counter() - step_start:.0f} s", flush=True)
    print(f"\npipeline done in {time.perf_counter() - start:.0f} s; report: {Path(args.root) / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
