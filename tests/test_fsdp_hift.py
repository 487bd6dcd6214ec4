"""HiFT under FSDP2 on 2 CPU ranks: a sharded checkpoint mid-cycle, a resume from it, and the same
model, optimizer state and Hugging Face logits as one uninterrupted single-process run.

Three runs of ``yamls/demo/hift.yaml`` (6 units: tied embedding, 4 blocks, final norm; ``down2up``, so
batch n trains unit (n - 1) mod 6) with global batch 8 and an evaluation after every batch. (FSDP2's root
module, which holds the embedding and the final norm, stays gathered after an evaluation's forward
with the requires_grad flags it had then. HiFT reshards it when it switches groups; without that, the
embedding trains again in batch 2, and batch 6, the norm's, has nothing to train: its backward fails.)

* ``fsdp``: ``composer -n 2`` (train.py's default FSDP2), ``fsdp_config {state_dict_type: sharded}``, stops after
  batch 3 (mid-cycle) with a sharded checkpoint.
* ``fsdp`` again with ``autoresume=true`` to batch 8: batches 7 and 8 train the embedding and block 0
  a second time, from the Adam moments parked before the stop and read back from the checkpoint.
* ``single``: one process, no FSDP, batches 1 to 8 (started beside the first launch).

Micro-batches of one sample on both sides: the loss is a token mean per micro-batch, so with several
samples per micro-batch the weighting would depend on how samples are grouped (by rank or by
micro-batch), a difference of Composer's accumulation, not of FSDP. ``optimizer.eps=1e-3``: with
the default 1e-8, Adam's first update of a unit is lr * sign(g), so gradient entries at rounding level
flip by 2 * lr between two orders of summation; with 1e-3 the update is a smooth function of the
gradient (gain at most lr / eps = 3) and a lost moment still moves a weight by ~1e-3. Without the
gloo fix in ``llmhift.build.trainer`` (torch 2.7's gloo reduce-scatter sums where FSDP2 asks for an average,
pytorch/pytorch#162338) the FSDP run would step with twice the gradient.

Float tolerances: both runs do the same fp32 arithmetic in a different order (gradients averaged over
2 ranks instead of accumulated over micro-batches in one process). Measured: weights 1.2e-7 apart,
Adam moments 2e-6 of their largest entry (q/k moments are small sums of cancelling terms), logits
7e-7 (largest logit 1.9). A wrong unit trained, a lost moment or a gradient off by a factor moves
weights by ~1e-3 (one lr), moments by O(1) of their size and logits by more than 1e-2 (measured: 0.09
with the parked state dropped, 0.14 with gradients summed over ranks), so the bounds (weights 1e-6,
moments 2e-5, logits 1e-5) sit ~10x above the noise and far below any real divergence. The parked
state read back after the resume is compared bit for bit with what the checkpoint holds.

This file is also the script each rank runs: ``composer -n 2 tests/test_fsdp_hift.py OUT overrides...``
runs ``train.main`` on the yaml and writes ``OUT/rank{R}.json`` (the batch it started at, the names of
the parameters whose local shard changed at each batch, the Trainer's algorithms) and, on rank 0,
``OUT/parked.pt`` (HiFT's parked optimizer state right after the load, gathered to full tensors).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
YAML = "yamls/demo/hift.yaml"
UNITS = ["embedding", "block.0", "block.1", "block.2", "block.3", "norm"]
STOP, END = 3, 8
LR = 3.0e-3  # the yaml's; cosine to 0.1 * LR over END batches
TIMEOUT_S = 240


def _overrides(tmp: Path, data: Path, name: str, batches: int) -> list[str]:
    return [
        f"variables.data_root={data}", f"variables.instructions={tmp / 'instructions'}", f"run_name={name}",
        f"save_folder={tmp / name}", f"max_duration={batches}ba", "eval_interval=1ba", f"save_interval={STOP}ba",
        "save_num_checkpoints_to_keep=-1", "global_train_batch_size=8", "device_train_microbatch_size=1",
        "device_eval_batch_size=4", "eval_subset_num_batches=1", "optimizer.eps=1e-3", "progress_bar=false",
        "log_to_console=false",
    ]  # fmt: skip


def unit_of(name: str) -> str:
    """``model.layers.2.attn.wq.weight`` -> ``block.2``; the embedding, the final norm."""
    parts = name.split(".")
    return f"block.{parts[2]}" if parts[1] == "layers" else {"tok_embeddings": "embedding", "norm": "norm"}[parts[1]]


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    from llmhift.datasets.instruction import build_demo_instructions
    from tests.helpers import _DIST_ENV, launch_ranks, rank_logs

    tmp = tmp_path_factory.mktemp("fsdp_hift")
    build_demo_instructions(tmp / "instructions")  # before the runs, which would race to build it

    env = {k: v for k, v in os.environ.items() if k not in (*_DIST_ENV, "FSDP_VERSION")}
    single = subprocess.Popen(  # one process, no FSDP; beside the first launch, which mostly waits on imports
        [sys.executable, "train.py", YAML, *_overrides(tmp, demo_root, "single", END), f"save_interval={END}ba"],
        cwd=REPO_ROOT, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        fsdp = ["fsdp_config={state_dict_type: sharded}", "autoresume=true"]
        for launch, batches in (("first", STOP), ("resumed", END)):
            args = [str(tmp / launch), *_overrides(tmp, demo_root, "fsdp", batches), *fsdp]
            logs = tmp / "logs" / launch
            process = launch_ranks(__file__, args, logs, timeout=TIMEOUT_S)
            assert process.returncode == 0, process.stdout[-4000:] + rank_logs(logs)
        output, _ = single.communicate(timeout=TIMEOUT_S)
    finally:
        if single.poll() is None:  # a launch failed or the reference hangs: do not leave it running
            single.kill()
            single.communicate()
    assert single.returncode == 0, output[-4000:]
    return tmp


def _steps(tmp: Path, launch: str) -> dict[int, list[str]]:
    ranks = [json.loads((tmp / launch / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["changed"] == ranks[1]["changed"]  # each rank's shard of a trained parameter moved
    return {int(step): names for step, names in ranks[0]["changed"].items()}


@pytest.mark.slow
def test_resumed_from_the_sharded_checkpoint_and_each_step_trained_its_unit(runs):
    tmp = runs
    started = {launch: {json.loads((tmp / launch / f"rank{r}.json").read_text())["started"] for r in range(2)}
               for launch in ("first", "resumed")}
    assert started == {"first": {0}, "resumed": {STOP}}
    assert (tmp / "fsdp" / f"ep0-ba{STOP}" / ".metadata").is_file()
    assert os.readlink(tmp / "fsdp" / "latest-rank0.pt") == f"ep0-ba{END}"
    steps = {**_steps(tmp, "first"), **_steps(tmp, "resumed")}
    assert sorted(steps) == list(range(END))
    names = json.loads((tmp / "first" / "rank0.json").read_text())["names"]
    for step, changed in steps.items():
        assert changed == [n for n in names if unit_of(n) == UNITS[step % len(UNITS)]], step
    # and only the active unit's parameters hold optimizer state in the optimizer (the rest is parked)
    for launch in ("first", "resumed"):
        for step, with_state in json.loads((tmp / launch / "rank0.json").read_text())["with_state"].items():
            assert with_state == sorted(steps[int(step)]), (launch, step)
    # HiFT's own log of the active group: every batch once, across both launches
    logged = [json.loads(line) for line in (tmp / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    groups = [(d["batch"], d["hift/active_group"]) for d in logged if "hift/active_group" in d]
    assert groups == [(b, b % len(UNITS)) for b in range(END)]
    # the rate of each cycle's first batch, on the schedule of the whole run (8 batches), also in the
    # first launch, whose own schedule ended at batch 3: cycle 0 at batch 0, cycle 1 at batch 6
    lrs = [d["hift/lr"] for d in logged if "hift/lr" in d]
    assert lrs == pytest.approx([LR] * 6 + [LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 8)))] * 2, rel=1e-6)
    ranks = [json.loads((tmp / "resumed" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["algorithms"] == [] for r in ranks)  # no DDP unused-parameter search asked for under FSDP


@pytest.mark.slow
def test_parked_optimizer_state_is_read_back_exactly(runs):
    import torch

    from llmhift.checkpoint.io import load_checkpoint

    tmp = runs
    saved = load_checkpoint(tmp / "fsdp" / f"ep0-ba{STOP}")["state"]["callbacks"]["HiFTCallback"]["optimizer_state"]
    parked = torch.load(tmp / "resumed" / "parked.pt")
    assert sorted({unit_of(n) for n in parked}) == sorted(UNITS[:STOP])  # the units trained before the stop
    assert parked.keys() == saved.keys()
    for name, state in parked.items():
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"], name
        for key, value in state.items():
            assert torch.equal(value, saved[name][key]), (name, key)


@pytest.mark.slow
def test_same_weights_and_optimizer_state_as_single_process(runs):
    import torch

    from llmhift.checkpoint.io import load_checkpoint

    tmp = runs
    fsdp, single = (load_checkpoint(tmp / name / "latest-rank0.pt")["state"] for name in ("fsdp", "single"))
    assert fsdp["model"].keys() == single["model"].keys()
    for name, weight in single["model"].items():
        torch.testing.assert_close(fsdp["model"][name], weight, rtol=0, atol=1e-6, msg=name)
    moments = [s["callbacks"]["HiFTCallback"]["optimizer_state"] for s in (fsdp, single)]
    assert moments[0].keys() == moments[1].keys() and {unit_of(n) for n in moments[1]} == set(UNITS)
    for name, state in moments[1].items():
        for key, value in state.items():
            atol = 2e-5 * value.abs().max().item()  # q/k moments are tiny sums of cancelling terms
            torch.testing.assert_close(moments[0][name][key], value, rtol=0, atol=atol, msg=f"{name} {key}")


@pytest.mark.slow
def test_same_hf_logits_as_single_process(runs):
    import torch
    from transformers import AutoModelForCausalLM

    from llmhift.convert.composer_to_hf import save_composer_to_hf

    tmp = runs
    input_ids = torch.arange(2 * 64).reshape(2, 64) * 7 % 2048  # (2, 64) tokens of the demo vocabulary
    logits = {}
    for name in ("fsdp", "single"):  # the sharded folder's symlink and the single file, as a user passes them
        model = AutoModelForCausalLM.from_pretrained(save_composer_to_hf(tmp / name / "latest-rank0.pt",
                                                                         tmp / "hf" / name)).eval()
        with torch.no_grad():
            logits[name] = model(input_ids).logits  # (2, 64, 2048)
    diff = (logits["fsdp"] - logits["single"]).abs().max().item()
    assert diff < 1e-5, diff


REFUSED = {
    "fsdp1": ("1", {}, {}, "FSDP_VERSION=2"),
    "param_dtype": ("2", {}, {"param_dtype": "bfloat16"}, "precision: amp_bf16"),
    "full_checkpoints": ("2", {"state_dict_type": "full"}, {}, "needs 'sharded'"),
    "offload_dir": ("2", {}, {"offload_dir": "parked"}, "offload_dir: not supported under FSDP"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_fsdp_settings_are_refused_naming_the_fix(case, monkeypatch):
    import torch
    from composer import Trainer
    from torch.utils.data import DataLoader

    from llmhift.callbacks import HiFTCallback
    from llmhift.models.llama import ComposerLlama
    from tests.test_hift import MODEL, Tokens

    version, fsdp, kwargs, fix = REFUSED[case]
    monkeypatch.setenv("FSDP_VERSION", version)
    model = ComposerLlama(MODEL)
    with pytest.raises(ValueError, match=fix):  # at INIT, before Composer would shard anything
        Trainer(model=model, train_dataloader=DataLoader(Tokens(), batch_size=8), max_duration="1ba", device="cpu",
                optimizers=torch.optim.AdamW(model.parameters()), callbacks=[HiFTCallback(**kwargs)],
                parallelism_config={"fsdp": fsdp}, progress_bar=False, log_to_console=False)


def _rank_main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    from composer import Callback
    from composer.utils import dist
    from torch.distributed.tensor import DTensor

    from llmhift.callbacks import HiFTCallback
    from tests.helpers import run_train_main

    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    class RecordChanges(Callback):
        """After each batch, the parameters whose local shard changed (FSDP2 has resharded by then)."""

        def __init__(self) -> None:
            self.changed: dict[int, list[str]] = {}
            self.with_state: dict[int, list[str]] = {}  # parameters holding optimizer state after the step

        def fit_start(self, state, logger) -> None:
            self.last = {n: local(p) for n, p in state.model.named_parameters()}

        def batch_end(self, state, logger) -> None:
            now = {n: local(p) for n, p in state.model.named_parameters()}
            step = int(state.timestamp.batch) - 1
            self.changed[step] = [n for n in now if not torch.equal(now[n], self.last[n])]
            names = {id(p): n for n, p in state.model.named_parameters()}
            self.with_state[step] = sorted(names[id(p)] for p in state.optimizers[0].state)
            self.last = now

    out, overrides = Path(argv[0]), argv[1:]
    recorder, result = RecordChanges(), {}

    def setup(trainer) -> None:
        trainer.state.callbacks.append(recorder)
        result["names"] = [n for n, _ in trainer.state.model.named_parameters()]
        result["algorithms"] = [type(a).__name__ for a in trainer.state.algorithms]
        hift = next(cb for cb in trainer.state.callbacks if isinstance(cb, HiFTCallback))
        parked = {n: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
                  for n, s in hift._parked.items()}  # a collective: every rank gathers
        if dist.get_global_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(parked, out / "parked.pt")

    record, exit_code = run_train_main([YAML, *overrides], setup)
    result.update(started=record["start_batch"], changed=recorder.changed, with_state=recorder.with_state)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_global_rank()}.json").write_text(json.dumps(result))
    return exit_code


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
