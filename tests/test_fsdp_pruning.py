"""Sheared-LLaMA pruning under FSDP2 on 2 CPU ranks: a sharded checkpoint, a resume from it, and the
same masks, losses, log-alphas and pruned model as a single-process run of the same data.

Three runs of ``yamls/demo/prune.yaml`` on the demo data, global batch 16, 6 batches:

* ``fsdp``: ``composer -n 2`` (train.py's default FSDP2), ``fsdp_config {FULL_SHARD, sharded}``, one micro-batch
  of 8 per rank, saving every 3 batches; it crashes at the start of batch 4, after the batch-3
  sharded checkpoint, like a killed job;
* ``fsdp`` again with ``autoresume=true``: resumes from the sharded checkpoint and runs to batch 6;
* ``single``: one process, no FSDP, two micro-batches of 8 per batch.

The evaluation at batch 3 changes the domain mix only from batch 3 + ``lookahead_batches`` (4) on,
after these runs, so both see the same train samples whatever their eval losses. Both final
checkpoints go through ``prune_and_save_model`` and ``save_composer_to_hf`` (the sharded one straight
from its ``latest-rank0.pt`` symlink) and the two Hugging Face models must give the same logits.

That holds only if every rank and micro-batch applies the same gates at a step (one draw per step),
the Lagrangian's gradient is averaged like the loss's, the mask and lambda groups keep ``lag_lr`` and
``-lag_lr`` through sharding, and the log-alphas gathered from the shards are the whole tensors.
Tolerances: the runs differ only in float summation order (a reduce-scatter of two per-rank means
against one process summing two micro-batches), ~1e-7 relative per gradient. Measured on this CPU:
logits 3e-7 apart, model weights 1.2e-7, log-alphas up to 7e-6 (Adam at lag_lr 1.0 scales a small,
noisy gradient up to a full step). Hence atol 1e-5 on logits and 1e-4 on log-alphas, lambdas and
masks; drawing the gates per rank instead (the fault this guards against) moves the log-alphas by
3.7 and the logits by 0.8.

This file is also the script each rank runs: ``composer -n 2 tests/test_fsdp_pruning.py OUT
[--crash-at N] YAML overrides...`` runs ``train.main`` and writes ``OUT/rank{R}.pt``: the batch it
started at, every training mask the L0 module produced on that rank, and the optimizer's groups.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
YAML = "yamls/demo/prune.yaml"
BATCHES, CRASH_AT = 6, 3
TIMEOUT_S = 240
LOGIT_ATOL, L0_ATOL = 1e-5, 1e-4  # see the module docstring


def _overrides(tmp: Path, data: Path, name: str) -> list[str]:
    return [
        f"variables.data_root={data}", f"run_name={name}", f"save_folder={tmp / name}",
        f"max_duration={BATCHES}ba", f"eval_interval={CRASH_AT}ba", f"save_interval={CRASH_AT}ba",
        "global_train_batch_size=16", "device_train_microbatch_size=8", "device_eval_batch_size=8",
        "eval_subset_num_batches=1", "model.l0_module.lagrangian_warmup_steps=4ba",
        "progress_bar=false", "log_to_console=false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    """The three runs; returns (tmp, {run name: per-rank records})."""
    import torch

    from tests.helpers import sharded_crash_resume_and_single  # here: this file also runs as a rank's script

    tmp = tmp_path_factory.mktemp("fsdp_pruning")
    records = sharded_crash_resume_and_single(__file__, YAML, lambda name: _overrides(tmp, demo_root, name), tmp,
                                              CRASH_AT, TIMEOUT_S, read=torch.load, record="rank{rank}.pt")
    return tmp, records


@pytest.mark.slow
def test_resumed_from_the_sharded_checkpoint_at_batch_3(runs):
    tmp, records = runs
    assert [(r["start_batch"], r["end_batch"], r["error"]) for r in records["first"]] == [(0, CRASH_AT, "simulated crash")] * 2
    assert [(r["start_batch"], r["end_batch"], r["error"]) for r in records["resumed"]] == [(CRASH_AT, BATCHES, None)] * 2
    assert sorted(p.name for p in (tmp / "fsdp" / f"ep0-ba{CRASH_AT}").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (tmp / "fsdp" / "latest-rank0.pt").resolve() == (tmp / "fsdp" / f"ep0-ba{BATCHES}").resolve()


@pytest.mark.slow
def test_every_rank_and_micro_batch_applies_the_same_masks_as_one_process(runs):
    import torch

    _, records = runs
    single = records["single"][0]["masks"]
    assert sorted(single) == list(range(BATCHES)) and all(len(calls) == 2 for calls in single.values())
    for rank in range(2):
        fsdp = {**records["first"][rank]["masks"], **records["resumed"][rank]["masks"]}
        assert sorted(fsdp) == list(range(BATCHES)) and all(len(calls) == 1 for calls in fsdp.values())
        for step in range(BATCHES):
            mask = fsdp[step][0]
            other = {**records["first"][1 - rank]["masks"], **records["resumed"][1 - rank]["masks"]}[step][0]
            for name in mask:
                assert torch.equal(mask[name], other[name]), (step, name)  # bit-identical across ranks
                assert torch.equal(single[step][0][name], single[step][1][name]), (step, name)  # and micro-batches
                torch.testing.assert_close(mask[name], single[step][0][name], rtol=0, atol=L0_ATOL, msg=f"{step} {name}")
    # evaluations (after batches 3 and 6) use the deterministic target masks, the same as in one process
    single_eval = records["single"][0]["eval_masks"]
    assert len(single_eval) == 2
    for rank in range(2):
        fsdp_eval = {**records["first"][rank]["eval_masks"], **records["resumed"][rank]["eval_masks"]}
        assert sorted(fsdp_eval) == sorted(single_eval)
        for step, masks in single_eval.items():
            for name, mask in masks.items():
                assert torch.equal(fsdp_eval[step][name] != 0, mask != 0), (step, name)  # the same entries kept
                torch.testing.assert_close(fsdp_eval[step][name], mask, rtol=0, atol=L0_ATOL, msg=f"{step} {name}")


@pytest.mark.slow
def test_mask_and_lambda_groups_keep_their_rates_through_sharding(runs):
    _, records = runs
    for record in (*records["resumed"], *records["single"]):
        weights, masks, lambdas = record["groups"]
        assert [masks["lr"], lambdas["lr"]] == [1.0, -1.0]  # lag_lr, -lag_lr (the yaml's lag_lr: 1.0)
        assert masks["names"] == sorted(f"mask_source.z_loga.{m}" for m in ("head", "intermediate", "layer", "hidden"))
        assert lambdas["names"] == sorted(f"mask_source.lambda_{i}.{m}" for i in (1, 2)
                                          for m in ("head", "intermediate", "layer", "hidden"))
        assert not any(n.startswith("mask_source.") for n in weights["names"])
    # under FSDP2 the L0 module is sharded with the model: its parameters are DTensors like the model's
    assert all(g["dtensor"] for r in records["resumed"] for g in r["groups"])
    assert not any(g["dtensor"] for g in records["single"][0]["groups"])


@pytest.mark.slow
def test_pruned_sharded_checkpoint_converts_to_the_single_process_model(runs):
    import torch
    from transformers import AutoModelForCausalLM

    from llmhift.checkpoint.io import load_checkpoint, model_state_dict
    from llmhift.convert.composer_to_hf import save_composer_to_hf
    from llmhift.convert.post_pruning import prune_and_save_model

    tmp, _ = runs
    l0 = [{k: v for k, v in model_state_dict(load_checkpoint(tmp / name / "latest-rank0.pt")).items()
           if k.startswith("mask_source.")} for name in ("fsdp", "single")]
    assert sorted(l0[0]) == sorted(l0[1]) and len(l0[0]) == 12
    for key, value in l0[1].items():  # log-alphas and lambdas, gathered whole from the shards
        torch.testing.assert_close(l0[0][key], value, rtol=0, atol=L0_ATOL, msg=key)

    input_ids = torch.arange(2 * 64).reshape(2, 64) * 7 % 2048  # (2, 64) any tokens of the demo vocabulary
    logits, shapes = {}, {}
    for name in ("fsdp", "single"):
        pruned = prune_and_save_model(tmp / name / "latest-rank0.pt")
        model = AutoModelForCausalLM.from_pretrained(save_composer_to_hf(pruned, tmp / "hf" / name)).eval()
        c = model.config
        shapes[name] = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers,
                        c.intermediate_size)
        with torch.no_grad():
            logits[name] = model(input_ids).logits  # (2, 64, 2048)
    assert shapes["fsdp"] == shapes["single"] == (64, 2, 1, 3, 176)  # the yaml's target_model
    diff = (logits["fsdp"] - logits["single"]).abs().max().item()
    print(f"max |logits fsdp - single| = {diff:.3g}")
    assert diff <= LOGIT_ATOL


def test_fsdp1_is_refused_with_the_fix_named():
    from types import SimpleNamespace

    from composer.utils.parallelism import FSDP2Config, FSDPConfig

    from llmhift.callbacks import PruningCallback

    with pytest.raises(ValueError, match="FSDP_VERSION=2"):
        PruningCallback().init(SimpleNamespace(fsdp_config=FSDPConfig()), None)
    PruningCallback().init(SimpleNamespace(fsdp_config=FSDP2Config()), None)  # accepted


def _rank_main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    from composer import Callback
    from composer.utils import dist
    from torch.distributed.tensor import DTensor

    from tests.helpers import run_train_main

    out = Path(argv[0])
    seen: dict = {"masks": {}, "eval_masks": {}}  # filled during the run

    def keep_masks(l0, args, kwargs, output) -> None:
        if not isinstance(output, dict):
            return  # the Lagrangian
        masks = {k: v.detach().clone() for k, v in output.items()}
        if l0.training:  # the gates a training forward applied, per call
            seen["masks"].setdefault(l0.step, []).append(masks)
        else:  # the deterministic masks of an evaluation (the same for each of its batches)
            seen["eval_masks"].setdefault(l0.step, masks)

    class Groups(Callback):
        def fit_end(self, state, logger) -> None:
            names = {id(p): n for n, p in state.model.named_parameters()}
            seen["groups"] = [
                {"lr": g["lr"], "names": sorted(names[id(p)] for p in g["params"]),
                 "dtensor": all(isinstance(p, DTensor) for p in g["params"])}
                for g in state.optimizers[0].param_groups
            ]  # fmt: skip

    def setup(trainer) -> None:
        trainer.state.model.mask_source.register_forward_hook(keep_masks, with_kwargs=True)
        trainer.state.callbacks.append(Groups())

    record, exit_code = run_train_main(argv[1:], setup)
    record.update(seen)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{dist.get_global_rank()}.pt")
    return exit_code


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))


@pytest.mark.slow
def test_training_progress_reads_a_sharded_folder_without_gathering_it(runs):
    """What ``python -m llmhift.evaluate`` records for a sharded checkpoint: its tokens and batches, the
    same as gathering the whole folder (the reference) reports."""
    from llmhift.checkpoint.io import load_checkpoint, training_progress

    tmp, _ = runs
    sharded = tmp / "fsdp" / f"ep0-ba{CRASH_AT}"
    tokens, batch = training_progress(sharded)
    timestamp = load_checkpoint(sharded)["state"]["timestamp"]
    timestamp = timestamp.get("Timestamp", timestamp)
    assert batch == CRASH_AT and tokens > 0
    assert (tokens, batch) == (int(timestamp["token"]), int(timestamp["batch"]))
