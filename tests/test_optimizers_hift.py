"""HiFT's parking with every CPU optimizer's own state layout (SGD's momentum buffer, Adagrad's sum,
Adafactor's factored row/column statistics, Lion's moment): in real Composer fits, at every step only
the active group's parameters hold state in the optimizer; the weights and the state equal, bit for bit,
a plain torch loop that keeps one optimizer per group over that group's parameters alone; and a run
killed mid-cycle (its state parked in ``offload_dir`` files) resumes to the uninterrupted run's weights
and state. (bitsandbytes' 8-bit optimizers need CUDA: their parking, quantization maps included, moves
every state tensor the same way, but no CPU test can run it.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer import Callback

from llmhift.build.config import OptimizerConfig
from llmhift.build.optimizers import make_optimizer
from llmhift.callbacks.hift import HiFTCallback
from llmhift.callbacks.hift.schedule import find_units
from llmhift.models.llama import ComposerLlama
from tests.helpers import CrashAt
from tests.test_hift import LR, MODEL, make_trainer

OPTIMIZERS = {  # each with state to park; the yaml's names and hyperparameters
    "sgd": OptimizerConfig(name="sgd", lr=LR, momentum=0.9, nesterov=True),
    "adagrad": OptimizerConfig(name="adagrad", lr=LR),
    "adafactor": OptimizerConfig(name="adafactor", lr=LR),
    "lion": OptimizerConfig(name="lion", lr=LR, betas=[0.9, 0.99]),
}
STEPS, CRASH = 8, 5  # 5 groups (units embedding, block.0, block.1, norm, head): the crash is mid cycle 1


class Trace(Callback):
    """Per step: the batch, the weights and the optimizer state after the update (by parameter name),
    and which parameters the optimizer held state for, and which HiFT had parked."""

    def __init__(self, hift: HiFTCallback) -> None:
        self.hift = hift
        self.batches, self.weights, self.held, self.parked, self.state = [], [], [], [], []

    def after_dataloader(self, state, logger) -> None:
        self.batches.append({k: v.clone() for k, v in state.batch.items()})

    def batch_end(self, state, logger) -> None:
        names = {p: n for n, p in state.model.named_parameters()}
        optimizer = state.optimizers[0]
        self.weights.append({n: p.detach().clone() for n, p in state.model.named_parameters()})
        self.held.append({names[p] for p in optimizer.state})
        self.parked.append(dict(self.hift._parked))
        self.state.append({names[p]: _clone(s) for p, s in optimizer.state.items()})


def _clone(state: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _equal_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def reference(opt: OptimizerConfig, batches: list[dict], reset: bool) -> tuple[list[dict], dict]:
    """HiFT written as a plain torch loop: down2up over single units, one optimizer per unit holding
    only that unit's parameters (a fresh one at each turn with ``reset``), the linear schedule held at
    each cycle's first batch. Returns the weights after every step and each unit's final state."""
    torch.manual_seed(0)
    model = ComposerLlama(MODEL)
    units = find_units(model)
    params = dict(model.named_parameters())
    optimizers: dict[int, torch.optim.Optimizer] = {}
    weights = []
    for step, batch in enumerate(batches):
        u = step % len(units)
        if reset or u not in optimizers:
            optimizers[u] = make_optimizer(opt, [params[n] for n in units[u][1]])
        lr = LR * (1 - (step // len(units)) * len(units) / STEPS)  # LinearScheduler 1 -> 0 over STEPS batches
        for group in optimizers[u].param_groups:
            group["lr"] = lr
        for name, p in params.items():
            p.requires_grad_(name in units[u][1])
            p.grad = None
        model.loss(model(batch), batch).backward()
        optimizers[u].step()
        weights.append({n: p.detach().clone() for n, p in params.items()})
    state = {n: _clone(o.state[p]) for o in optimizers.values() for n, p in params.items() if p in o.state}
    return weights, state


def _fit(opt: OptimizerConfig, hift: HiFTCallback, **kwargs) -> tuple:
    trace = Trace(hift)
    trainer = make_trainer(hift, [trace], max_duration=f"{STEPS}ba", optimizer=lambda p: make_optimizer(opt, p),
                           **kwargs)
    trainer.fit()
    return trainer, trace


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizers_state_is_parked_and_resumes_exactly(name, tmp_path):
    opt = OPTIMIZERS[name]
    hift = HiFTCallback()
    _, full = _fit(opt, hift, save_folder=tmp_path / "full")
    units = [set(names) for _, names in hift.units]
    eager = bool(make_optimizer(opt, [torch.nn.Parameter(torch.zeros(1))]).state)
    ref_weights, ref_state = reference(opt, full.batches, reset=False)
    for step in range(STEPS):
        active = units[step % len(units)]
        assert full.held[step] == active, step  # only the active group holds state in the optimizer
        # every unit that has had a turn; Adagrad builds its state for every parameter in its constructor
        trained_before = set().union(*units[:len(units) if eager else min(step, len(units))])
        assert set(full.parked[step]) == trained_before - active, step
        for n, w in ref_weights[step].items():
            assert torch.equal(full.weights[step][n], w), (step, n)
    final = {**{n: dict(s) for n, s in full.parked[-1].items()}, **full.state[-1]}
    assert set(final) == set(ref_state) and all(_equal_state(final[n], ref_state[n]) for n in final)
    if name == "adafactor":  # the factored layout, parked as it is: rows and columns of each matrix
        weight = next(n for n in final if n.endswith("wq.weight"))
        assert final[weight]["row_var"].shape[-1] == 1 and final[weight]["col_var"].shape[-2] == 1

    folder = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        make_trainer(HiFTCallback(offload_dir=str(tmp_path / "parked")), [CrashAt(CRASH)],
                     max_duration=f"{STEPS}ba", optimizer=lambda p: make_optimizer(opt, p), save_folder=folder,
                     autoresume=True).fit()
    resumed_hift = HiFTCallback(offload_dir=str(tmp_path / "parked"))
    trainer, resumed = _fit(opt, resumed_hift, save_folder=folder, autoresume=True)
    assert len(resumed.batches) == STEPS - 4  # from the checkpoint at batch 4, mid cycle
    assert all(isinstance(p, Path) and p.is_file() for p in resumed_hift._parked.values())
    assert resumed.held[-1] == full.held[-1]
    for n, w in full.weights[-1].items():
        assert torch.equal(resumed.weights[-1][n], w), n
    back = {**{n: torch.load(p, weights_only=True) for n, p in resumed_hift._parked.items()}, **resumed.state[-1]}
    assert set(back) == set(final) and all(_equal_state(back[n], final[n]) for n in final)


@pytest.mark.parametrize("name", ["adafactor", "sgd"])
def test_reset_starts_each_turn_from_fresh_state(name):
    opt = OPTIMIZERS[name]
    hift = HiFTCallback(optimizer_state="reset")
    _, run = _fit(opt, hift)
    ref_weights, _ = reference(opt, run.batches, reset=True)
    units = [set(names) for _, names in hift.units]
    for step in range(STEPS):
        assert run.held[step] == units[step % len(units)] and not run.parked[step], step
        for n, w in ref_weights[step].items():
            assert torch.equal(run.weights[step][n], w), (step, n)
