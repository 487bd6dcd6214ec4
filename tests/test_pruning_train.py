"""Pruning through train.py: the 7B yamls' sizes, a demo run that reaches its target, exact resume."""

import dataclasses

import pytest
import torch
from composer import Callback
from transformers import AutoModelForCausalLM

import train
from llmhift.build.config import load_config
from llmhift.build.trainer import build_model, build_trainer
from llmhift.convert.composer_to_hf import save_composer_to_hf
from llmhift.convert.post_pruning import prune_and_save_model
from tests.helpers import CrashAt, config_only_model

DEMO_PRUNE = "yamls/demo/prune.yaml"
TARGET = {"d_model": 64, "n_heads": 2, "n_kv_heads": 1, "n_layers": 3, "intermediate_size": 176}


def overrides(demo_root, save_folder, *extra):
    return [f"variables.data_root={demo_root}", f"save_folder={save_folder}", "progress_bar=false",
            "log_to_console=false", *extra]


@pytest.mark.parametrize("size, target", [("1.3b", 1.35e9), ("2.7b", 2.70e9)])
def test_7b_pruning_yamls_dry_run_print_source_and_target(size, target, tmp_path, capsys):
    source = f"variables.source_model={config_only_model(tmp_path)}"  # the yaml takes the 7B shape from there
    assert train.main([f"yamls/pruning/llama2_7b_to_{size}.yaml", "--dry-run", source]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("pruning: "))
    source_count = int(line.split("source ")[1].split(" ")[0].replace(",", ""))
    target_count = int(line.split("target ")[1].split(" ")[0].replace(",", ""))
    assert "(6.74B)" in line and abs(source_count - 6.74e9) / 6.74e9 < 0.001, line
    assert abs(target_count - target) / target < 0.01, line


class Record(Callback):
    """Per batch: the total and Lagrangian losses; at the end: the L0 module's parameters."""

    def __init__(self):
        self.losses, self.penalties = {}, {}

    def batch_end(self, state, logger):
        self.losses[int(state.timestamp.batch)] = float(state.loss["total"])
        self.penalties[int(state.timestamp.batch)] = float(state.loss["lagrangian"])



def fit(config, *callbacks):
    trainer = build_trainer(config)
    trainer.state.callbacks.extend(callbacks)
    trainer.fit()
    return trainer


@pytest.mark.slow
def test_demo_pruning_reaches_the_target_and_exports_it(demo_root, tmp_path):
    config = load_config(DEMO_PRUNE, overrides(demo_root, tmp_path / "ckpt", "max_duration=100ba",
                                               "model.l0_module.lagrangian_warmup_steps=20ba",
                                               "global_train_batch_size=4", "device_train_microbatch_size=4",
                                               "eval_interval=100ba", "eval_subset_num_batches=1",
                                               "save_interval=100ba"))
    trainer = fit(config)
    l0 = trainer.state.model.mask_source
    for name in l0.masks:
        gap = l0.expected_sparsity(name).mean().item() - l0.masks[name].target_sparsity
        assert abs(gap) <= 0.02, (name, gap)

    pruned_path = prune_and_save_model(tmp_path / "ckpt" / "latest-rank0.pt")
    hf = AutoModelForCausalLM.from_pretrained(save_composer_to_hf(pruned_path, tmp_path / "hf")).eval()
    c = hf.config
    assert dict(d_model=c.hidden_size, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                n_layers=c.num_hidden_layers, intermediate_size=c.intermediate_size) == TARGET
    ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    masked = trainer.state.model.eval()  # eval_target_model: the exact target masks
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, masked({"input_ids": ids}), rtol=0, atol=1e-5)

    # The continued-pretraining path: model.pretrained with the target shape, no l0_module.
    section = {k: v for k, v in config.model.items() if k != "l0_module"}
    section.update(TARGET, pretrained=str(pruned_path))
    dense = build_model(dataclasses.replace(config, model=section, callbacks={}))
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()({"input_ids": ids}), hf(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_pruning_resumes_exactly(demo_root, tmp_path):
    common = ["max_duration=6ba", "model.l0_module.lagrangian_warmup_steps=4ba", "global_train_batch_size=4",
              "device_train_microbatch_size=2", "eval_interval=3ba", "eval_subset_num_batches=1",
              "save_interval=2ba", "autoresume=true", "run_name=prune-resume"]
    full = Record()
    uninterrupted = fit(load_config(DEMO_PRUNE, overrides(demo_root, tmp_path / "full", *common)), full)

    first = Record()
    with pytest.raises(KeyboardInterrupt):
        fit(load_config(DEMO_PRUNE, overrides(demo_root, tmp_path / "crashed", *common)), first, CrashAt(5))
    resumed_log = Record()
    resumed = build_trainer(load_config(DEMO_PRUNE, overrides(demo_root, tmp_path / "crashed", *common)))
    assert int(resumed.state.timestamp.batch) == 4
    resumed.state.callbacks.append(resumed_log)
    resumed.fit()

    assert sorted(resumed_log.losses) == [5, 6]
    for batch in (5, 6):
        assert resumed_log.losses[batch] == full.losses[batch], batch
        assert resumed_log.penalties[batch] == full.penalties[batch], batch
    assert full.penalties[6] != 0.0  # the lambdas really moved
    a, b = uninterrupted.state.model.mask_source, resumed.state.model.mask_source
    for name, tensor in a.state_dict().items():  # log-alphas and lambdas
        assert torch.equal(tensor, b.state_dict()[name]), name
