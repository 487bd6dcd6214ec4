"""Pruning and dynamic batch loading on a composer.Trainer built by hand, as a user of the package would:
no train.py, no llmhift.build. Each runs a few batches, resumes exactly, and refuses a wrong setup in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import torch
from composer import Callback, Evaluator, Trainer
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from torch.utils.data import DataLoader, Subset

from llmhift.callbacks import DynamicLoadingCallback, PruningCallback
from llmhift.datasets.dynamic_streaming import DynamicStreamingDataset
from llmhift.datasets.text import EverySample, MultiDomainTextDataset, find_domains
from llmhift.models.l0_module import HELD_LR_KEY, L0Module, pruning_param_groups
from llmhift.models.llama import ComposerLlama, LlamaConfig
from tests.helpers import CrashAt

CONFIG = LlamaConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=64,
                     max_seq_len=128, tie_word_embeddings=True)  # the demo data's vocabulary and length
BATCH = 4


def seeded_model(l0: bool, eval_domains: Sequence[str] = ()) -> ComposerLlama:
    torch.manual_seed(17)  # the same initial weights and log-alphas in every run of a test
    mask = L0Module(CONFIG, {"n_layers": 1, "intermediate_size": 32}, ["layer", "intermediate"],
                    lagrangian_warmup_steps=2) if l0 else None
    return ComposerLlama(CONFIG, mask_source=mask, eval_domains=eval_domains)


def train_loader(mds: Path) -> DataLoader:
    dataset = DynamicStreamingDataset(str(mds), "train", find_domains(mds, "train"), BATCH, lookahead_batches=1)
    return DataLoader(dataset, batch_size=BATCH)


def eval_loader(mds: Path) -> DataLoader:
    """Every 8th eval sample: a few from every domain (the folder holds them domain after domain)."""
    text = EverySample(MultiDomainTextDataset(str(mds), "eval", find_domains(mds, "eval"), 16, shuffle=False))
    return DataLoader(Subset(text, range(0, len(text), 8)), batch_size=16)


def trainer(model, optimizer, loader, callbacks: list[Callback], folder: Path, **kwargs) -> Trainer:
    """A CPU fit of 4 batches whose LR warms up over 2 (so a schedule applied to the masks would show),
    saving at batch 2."""
    return Trainer(model=model, optimizers=optimizer, train_dataloader=loader, callbacks=callbacks,
                   schedulers=CosineAnnealingWithWarmupScheduler(t_warmup="2ba"), max_duration="4ba",
                   save_folder=str(folder), save_interval="2ba", save_overwrite=True, device="cpu", seed=17,
                   progress_bar=False, log_to_console=False, **kwargs)


def find(run: Trainer, cls: type) -> Callback:
    return next(cb for cb in run.state.callbacks if isinstance(cb, cls))


def assert_same_weights(a: Trainer, b: Trainer) -> None:
    left, right = a.state.model.state_dict(), b.state.model.state_dict()
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


# ---- pruning ---------------------------------------------------------------------------------------


def pruning_run(mds: Path, folder: Path, crash: Sequence[Callback] = (), **kwargs) -> Trainer:
    model = seeded_model(l0=True)
    optimizer = DecoupledAdamW(pruning_param_groups(model, lag_lr=1.0), lr=3e-3)
    return trainer(model, optimizer, train_loader(mds), [PruningCallback(), *crash], folder, **kwargs)


@pytest.mark.slow
def test_pruning_trains_and_resumes_exactly(demo_root, tmp_path):
    mds = demo_root / "mds"
    whole = pruning_run(mds, tmp_path / "whole")
    l0 = whole.state.model.mask_source
    start = {k: v.clone() for k, v in l0.state_dict().items()}
    whole.fit()
    assert int(whole.state.timestamp.batch) == 4
    masks, lambdas = whole.state.optimizers[0].param_groups[1:]
    assert (masks["lr"], lambdas["lr"]) == (1.0, -1.0)  # held through the warmup, which scales weights only
    # The weights' rate at batch 3 (the last set): cosine halfway from the end of warmup (2ba) to 4ba.
    assert whole.state.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 3e-3)
    # Gradient ascent on the lambdas: the masks lag their target (expected sparsity < target), so the
    # penalty's gradient in lambda_1, mean(s - t), is negative and lambda_1 grows negative.
    for name in l0.masks:
        assert not torch.equal(l0.z_loga[name], start[f"z_loga.{name}"]), name
        assert l0.lambda_1[name].item() < 0, name

    crashed = pruning_run(mds, tmp_path / "parts", [CrashAt(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    crashed.close()
    resumed = pruning_run(mds, tmp_path / "parts", load_path=str(tmp_path / "parts" / "ep0-ba2-rank0.pt"))
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 4
    assert_same_weights(whole, resumed)  # model weights, log-alphas and lambdas
    assert find(resumed, PruningCallback).step == find(whole, PruningCallback).step == 3
    whole.close()
    resumed.close()


def held(params: list, rate: float) -> dict:
    return {"params": params, "lr": rate, HELD_LR_KEY: rate, "weight_decay": 0.0}


WRONG_OPTIMIZERS = {
    "plain AdamW over model.parameters()": (
        lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3), "is in a group the LR schedule scales"),
    "lambdas held at +lag_lr (descent)": (
        lambda model: DecoupledAdamW([*pruning_param_groups(model, 1.0)[:2],
                                      held(pruning_param_groups(model, 1.0)[2]["params"], 1.0)], lr=1e-3),
        "is held at 1.0, needs a negative rate"),
    "lambdas left out": (lambda model: DecoupledAdamW(pruning_param_groups(model, 1.0)[:2], lr=1e-3),
                         "is in no optimizer group"),
}


@pytest.mark.parametrize("case", sorted(WRONG_OPTIMIZERS))
def test_pruning_refuses_an_optimizer_not_built_by_pruning_param_groups(case, demo_root, tmp_path):
    build, problem = WRONG_OPTIMIZERS[case]
    model = seeded_model(l0=True)
    run = trainer(model, build(model), train_loader(demo_root / "mds"), [PruningCallback()], tmp_path)
    with pytest.raises(ValueError) as err:
        run.fit()
    message = str(err.value)
    assert "\n" not in message and problem in message and "pruning_param_groups(model, lag_lr)" in message, message
    assert int(run.state.timestamp.batch) == 0  # refused before the first batch
    run.close()


def test_pruning_param_groups_needs_an_l0_module_and_a_positive_rate():
    with pytest.raises(ValueError, match="has no L0Module as mask_source"):
        pruning_param_groups(seeded_model(l0=False), 1.0)
    with pytest.raises(ValueError, match="lag_lr: must be a positive number"):
        pruning_param_groups(seeded_model(l0=True), -1.0)


# ---- dynamic batch loading -------------------------------------------------------------------------


def loading_run(mds: Path, folder: Path, extra: Sequence[Callback] = (), domains: Sequence[str] | None = None,
                loader: DataLoader | None = None, **kwargs) -> Trainer:
    names = find_domains(mds, "train")
    model = seeded_model(l0=False, eval_domains=names if domains is None else domains)
    # Targets far below a random model's loss (~7.6): every domain lags, the largest excess gains weight.
    callback = DynamicLoadingCallback(names, [1 / len(names)] * len(names), [2.0] * len(names))
    evaluator = Evaluator(label="eval", dataloader=eval_loader(mds))
    return trainer(model, DecoupledAdamW(model.parameters(), lr=3e-3), loader or train_loader(mds), [callback, *extra],
                   folder, eval_dataloader=evaluator, eval_interval="2ba", **kwargs)


@pytest.mark.slow
def test_dynamic_loading_trains_and_resumes_exactly(demo_root, tmp_path):
    mds = demo_root / "mds"
    whole = loading_run(mds, tmp_path / "whole")
    whole.fit()
    callback, dataset = find(whole, DynamicLoadingCallback), whole.state.train_dataloader.dataset
    assert [entry["first_sample"] for entry in callback.history] == [3 * BATCH, 5 * BATCH]  # 1 batch ahead
    assert dataset.proportion != [0.25] * 4 and sum(dataset.proportion) == pytest.approx(1.0)

    crashed = loading_run(mds, tmp_path / "parts", [CrashAt(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    crashed.close()
    resumed = loading_run(mds, tmp_path / "parts", load_path=str(tmp_path / "parts" / "ep0-ba2-rank0.pt"))
    resumed.fit()
    assert_same_weights(whole, resumed)
    assert resumed.state.train_dataloader.dataset.schedule() == dataset.schedule()  # proportions and where
    assert find(resumed, DynamicLoadingCallback).history == callback.history
    whole.close()
    resumed.close()


def test_dynamic_loading_refuses_a_loader_that_is_not_dynamic(demo_root, tmp_path):
    mds = demo_root / "mds"
    run = loading_run(mds, tmp_path, loader=eval_loader(mds))  # the text dataset: a fixed mix
    with pytest.raises(TypeError) as err:
        run.fit()
    assert "\n" not in str(err.value) and "DynamicStreamingDataset" in str(err.value), err.value
    run.close()


def test_dynamic_loading_refuses_a_model_without_per_domain_eval_losses(demo_root, tmp_path):
    run = loading_run(demo_root / "mds", tmp_path, domains=[])
    with pytest.raises(ValueError) as err:
        run.fit()
    message = str(err.value)
    assert "\n" not in message and "eval_domains=" in message and "code" in message, message
    assert int(run.state.timestamp.batch) == 0
    run.close()
