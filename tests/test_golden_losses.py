"""Golden per-step training losses: tiny fixed-seed runs of the demo yamls (6 steps, fp32, CPU, one
thread) whose losses are stored in ``tests/golden/<name>.json`` and asserted step by step, as
torchtitan's ``tests/assets/losses`` and torchtune's recipe tests do. A change that moves any step's
loss (an initialisation, a mask, the Lagrangian, the schedule, the data order, a HiFT group) fails here
with the step named, even when every other test still passes.

Not bit-exact (``pytest.approx(rel=1e-6)``): the same code on another CPU type gives losses that differ
in their last bits (the BLAS library picks other kernels, which sum in another order), while a real
change moves them by far more. After an intended change, regenerate and say why in the commit::

    LLMHIFT_REGEN_GOLDEN=1 python -m pytest tests/test_golden_losses.py

The demo corpus is built from the running interpreter's standard library, so each file also records
the corpus it was measured on (its ``demo.json``); an interpreter that builds another corpus skips the
comparison and says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from composer import Callback

from llmhift.build.config import load_config
from llmhift.build.trainer import build_trainer
from llmhift.datasets.demo_data import MARKER_NAME

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("LLMHIFT_REGEN_GOLDEN") == "1"
STEPS = 6
# Two micro-batches per step, so gradient accumulation is part of what the losses pin down.
COMMON = [f"max_duration={STEPS}ba", "global_train_batch_size=8", "device_train_microbatch_size=4",
          f"eval_interval={STEPS}ba", "eval_subset_num_batches=1", f"save_interval={STEPS}ba",
          "progress_bar=false", "log_to_console=false"]  # fmt: skip
RUNS = {
    "pretrain": ("yamls/demo/pretrain.yaml", []),
    # the target sparsity ramps over the 6 steps, so the Lagrangian term moves from the first step on
    "prune": ("yamls/demo/prune.yaml", ["model.l0_module.lagrangian_warmup_steps=4ba"]),
    "hift": ("yamls/demo/hift.yaml", []),  # 6 units, one per group: one full cycle, each unit trained once
}


class LossLog(Callback):
    """Each step's training loss terms as the Trainer logs them (``loss/train/total``, ...): the mean over
    the whole batch. Not ``state.loss``, which at BATCH_END holds the last micro-batch's loss only."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def batch_end(self, state, logger) -> None:
        del logger  # unused
        self.steps.append(dict(state.total_loss_dict))


def run_losses(yaml: str, overrides: list[str]) -> dict[str, list[float]]:
    """{loss term: its value at steps 1..STEPS} of one run, on one CPU thread (fewer summation orders)."""
    log = LossLog()
    trainer = build_trainer(load_config(yaml, overrides))
    trainer.state.callbacks.append(log)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
        trainer.close()
    assert len(log.steps) == STEPS
    return {key: [step[key] for step in log.steps] for key in log.steps[0]}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_per_step_losses_match_the_golden_file(name, demo_root, tmp_path):
    yaml, extra = RUNS[name]
    path = GOLDEN / f"{name}.json"
    corpus = json.loads((demo_root / MARKER_NAME).read_text())
    golden = None if REGEN else json.loads(path.read_text())
    if golden is not None and golden["corpus"] != corpus:
        pytest.skip(f"{path} was measured on the demo corpus of Python {golden['corpus']['python']}; this "
                    f"interpreter builds another ({corpus}), so the losses cannot be compared")
    overrides = [*COMMON, *extra]
    losses = run_losses(yaml, [f"variables.data_root={demo_root}", f"variables.instructions={tmp_path / 'instr'}",
                               f"save_folder={tmp_path / 'ckpt'}", *overrides])
    if golden is None:
        record = {"yaml": yaml, "overrides": overrides, "corpus": corpus, "torch": torch.__version__, "losses": losses}
        path.write_text(json.dumps(record, indent=1) + "\n")
        pytest.skip(f"LLMHIFT_REGEN_GOLDEN=1: wrote {path}; nothing was compared")
    assert (golden["yaml"], golden["overrides"]) == (yaml, overrides), f"{path} holds another run: regenerate it"
    assert sorted(losses) == sorted(golden["losses"])
    for key, values in losses.items():
        assert values == pytest.approx(golden["losses"][key], rel=1e-6), f"{name}: {key} at steps 1..{STEPS}"
