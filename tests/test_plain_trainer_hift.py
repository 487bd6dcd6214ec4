"""HiFTCallback on a plain Composer Trainer, as a user builds one (no train.py, no llmhift.build):
ComposerLlama, torch's AdamW, the demo instruction data through llmhift.datasets, and
``callbacks=[HiFTCallback(...)]``. It trains one group per step, resumes exactly, and refuses a wrong
setup in one line.

This file is also the script each rank of the DDP case runs:
``composer -n 2 tests/test_plain_trainer_hift.py OUT TOKENIZER INSTRUCTIONS`` writes ``OUT/rank{R}.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from composer import Callback, Trainer
from composer.optim import LinearScheduler
from composer.utils import dist
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from llmhift.callbacks import DDPFindUnusedParameters, HiFTCallback
from llmhift.datasets.instruction import InstructionDataset, build_demo_instructions
from llmhift.models.llama import ComposerLlama
from tests.helpers import REPO_ROOT, CrashAt, launch_ranks, rank_logs

# The demo tokenizer's vocabulary; 2 blocks and an untied head: units embedding, block.0, block.1, norm, head
MODEL = dict(vocab_size=2048, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64)


def instruction_data(tokenizer: Path, folder: Path) -> InstructionDataset:
    return InstructionDataset(build_demo_instructions(folder), "train", AutoTokenizer.from_pretrained(tokenizer),
                              MODEL["max_seq_len"], packing=True)


@pytest.fixture(scope="module")
def data(demo_root, tmp_path_factory) -> InstructionDataset:
    return instruction_data(demo_root / "tokenizer", tmp_path_factory.mktemp("instructions"))


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def make_trainer(hift: HiFTCallback, data: InstructionDataset, callbacks=(), optimizer=adamw,
                 scheduler=lambda optimizer: LinearScheduler(alpha_i=1.0, alpha_f=0.1, t_max="1dur"),
                 **kwargs) -> Trainer:
    """``optimizer(params)`` and ``scheduler(optimizer)`` build those of the Trainer."""
    torch.manual_seed(0)
    model = ComposerLlama(MODEL)
    loader = DataLoader(data, batch_size=4, sampler=dist.get_sampler(data, shuffle=True, seed=3), drop_last=True)
    optimizer = optimizer(model.parameters())
    return Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer,
        schedulers=scheduler(optimizer),
        device="cpu",
        precision="fp32",
        seed=17,
        callbacks=[hift, *callbacks],
        run_name="plain-hift",
        progress_bar=False,
        log_to_console=False,
        **kwargs,
    )


class ChangedUnits(Callback):
    """The units whose parameters changed at each step (asserting that a unit moves as a whole)."""

    def __init__(self, hift: HiFTCallback) -> None:
        self.hift, self.changed = hift, []

    def batch_start(self, state, logger) -> None:
        self.before = {n: p.detach().clone() for n, p in state.model.named_parameters()}

    def batch_end(self, state, logger) -> None:
        params = dict(state.model.named_parameters())
        moved = {n for n, before in self.before.items() if not torch.equal(before, params[n])}
        self.changed.append([unit for unit, names in self.hift.units if moved & set(names)])
        assert moved == {n for unit, names in self.hift.units if unit in self.changed[-1] for n in names}


def test_only_the_active_group_changes_at_each_step(data):
    hift = HiFTCallback(strategy="up2down")
    changes = ChangedUnits(hift)
    make_trainer(hift, data, [changes], max_duration="6ba").fit()
    assert changes.changed == [["head"], ["norm"], ["block.1"], ["block.0"], ["embedding"], ["head"]]


def test_resume_mid_cycle_ends_with_the_uninterrupted_weights(data, tmp_path):
    def hift() -> HiFTCallback:  # groups [embedding, block.0], [block.1, norm], [head]: 3 per cycle
        return HiFTCallback(group_element=2, strategy="random", seed=3)

    full = make_trainer(hift(), data, max_duration="7ba")
    full.fit()
    folder = dict(save_folder=str(tmp_path / "ck"), save_interval="2ba", autoresume=True, max_duration="7ba")
    with pytest.raises(KeyboardInterrupt):
        make_trainer(hift(), data, [CrashAt(4)], **folder).fit()
    resumed = make_trainer(hift(), data, **folder)
    assert int(resumed.state.timestamp.batch) == 4  # in the middle of cycle 1
    resumed.fit()
    expected = dict(full.state.model.named_parameters())
    for name, p in resumed.state.model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_switch_every_trains_each_group_k_steps_with_lisa_units_every_step(data):
    # LISA's always-active embedding and head, the blocks and the norm cycled two steps each (K = 2)
    hift = HiFTCallback(switch_every=2, always_active=[0, -1])
    changes = ChangedUnits(hift)
    make_trainer(hift, data, [changes], max_duration="7ba").fit()
    assert changes.changed == [["embedding", "block.0", "head"]] * 2 + [["embedding", "block.1", "head"]] * 2 + [
        ["embedding", "norm", "head"]] * 2 + [["embedding", "block.0", "head"]]


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_resume_mid_block_ends_with_the_uninterrupted_weights(data, tmp_path, mode):
    def hift() -> HiFTCallback:  # 3 groups x K = 3 steps: batch 4 is the second step of the second block
        return HiFTCallback(group_element=2, switch_every=3, strategy="random", seed=3, optimizer_state=mode)

    full = make_trainer(hift(), data, max_duration="8ba")
    full.fit()
    folder = dict(save_folder=str(tmp_path / "ck"), save_interval="2ba", autoresume=True, max_duration="8ba")
    with pytest.raises(KeyboardInterrupt):
        make_trainer(hift(), data, [CrashAt(4)], **folder).fit()
    resumed = make_trainer(hift(), data, **folder)
    assert int(resumed.state.timestamp.batch) == 4
    resumed.fit()
    expected = dict(full.state.model.named_parameters())
    for name, p in resumed.state.model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_refusals_are_one_line_naming_the_fix(data):
    def refusal(run) -> str:
        with pytest.raises(ValueError) as caught:
            run()
        assert "\n" not in str(caught.value)
        return str(caught.value)

    # units: embedding, block.0, block.1, norm, head
    assert refusal(lambda: make_trainer(HiFTCallback(group_element=6), data, max_duration="1ba")) == (
        "group_element: 6 is larger than the 5 cycled units, which would train them all at once "
        "(full fine-tuning); use at most 5")

    def blocks_only(params) -> torch.optim.Optimizer:  # a user who meant to tune the blocks' matrices alone
        return adamw([p for p in params if p.ndim == 2 and p.shape[0] != MODEL["vocab_size"]])

    message = refusal(make_trainer(HiFTCallback(), data, optimizer=blocks_only, max_duration="1ba").fit)
    assert message.startswith("optimizer: HiFT needs every trainable parameter in it, ")
    assert message.endswith("; build it from model.parameters()")

    def step_lr(optimizer) -> torch.optim.lr_scheduler.LRScheduler:  # torch's own: no per-cycle hold possible
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)

    message = refusal(make_trainer(HiFTCallback(), data, scheduler=step_lr, max_duration="1ba").fit)
    assert message.startswith("schedulers: HiFT holds the rate per cycle for Composer schedulers only; use one of ")


@pytest.mark.slow
def test_ddp_needs_the_algorithm_and_runs_with_it(demo_root, data, tmp_path):
    """Two ranks over gloo: without DDPFindUnusedParameters the Trainer is refused at INIT; with it,
    both ranks train and end bit-identical."""
    out, instructions = tmp_path / "out", tmp_path / "instructions"
    build_demo_instructions(instructions)
    process = launch_ranks(__file__, [str(out), str(demo_root / "tokenizer"), str(instructions)],
                           tmp_path / "logs", timeout=240, env={"PYTHONPATH": str(REPO_ROOT)})
    assert process.returncode == 0, process.stdout[-4000:] + rank_logs(tmp_path / "logs")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["refusal"] == ranks[1]["refusal"] == (
        "algorithms: HiFT under DDP needs Trainer(algorithms=[DDPFindUnusedParameters()]) (from llmhift.callbacks): "
        "inactive groups get no gradient, which Composer's DDP looks for only when an Algorithm asks")
    assert ranks[0]["find_unused_parameters"] is True
    assert ranks[0]["params"] == ranks[1]["params"]


def _rank_main(out: Path, tokenizer: Path, instructions: Path) -> None:
    data = instruction_data(tokenizer, instructions)
    record = {}
    try:
        make_trainer(HiFTCallback(), data, max_duration="3ba")
    except ValueError as err:
        record["refusal"] = str(err)
    trainer = make_trainer(HiFTCallback(), data, max_duration="3ba", algorithms=[DDPFindUnusedParameters()])
    trainer.fit()
    record["find_unused_parameters"] = trainer.state.model.find_unused_parameters
    record["params"] = {n: hashlib.sha1(p.detach().numpy().tobytes()).hexdigest()
                        for n, p in trainer.state.model.named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_global_rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _rank_main(*map(Path, sys.argv[1:4]))
