"""Dynamic batch loading under FSDP2 on 2 CPU ranks: a sharded checkpoint, a resume from it, and the
same data, proportions, eval losses and model as a single-process run of the same yaml.

Three runs of ``yamls/demo/pretrain.yaml`` (``train_loader.name: dynamic``, ``callbacks.data_loading``)
with global batch 16, an evaluation every 2 batches and ``lookahead_batches: 1``, so the evaluations
after batches 2 and 4 change the mix from global sample 48 (batch 4) and 80 (batch 6) on:

* ``fsdp``: ``composer -n 2`` (train.py's default FSDP2), ``fsdp_config {FULL_SHARD, sharded}``, saving every 3
  batches; it crashes at the start of batch 4, after the batch-3 sharded checkpoint, like a killed
  job. (A launch that simply ended at batch 3 would also evaluate there, as Composer does at the end
  of every fit, and change the mix where the reference run does not.)
* ``fsdp`` again with ``autoresume=true``: resumes from the sharded checkpoint and runs to batch 6.
* ``single``: one process, no FSDP, batches 1 to 6.

Both final checkpoints (the sharded folder behind ``latest-rank0.pt``, and the single file) go
through ``save_composer_to_hf``; the two HF models must give the same logits.

Float tolerances: the two runs do the same fp32 arithmetic in a different order (the gradient is
averaged over 2 ranks instead of over 2 micro-batches in one process, eval sums are split over
ranks), which perturbs results at fp32 rounding (measured: logits 7e-7 apart, AdamW moments 7e-7,
proportions 9e-7 and eval losses 6e-8 relative). Training moves the logits by ~0.3 per batch here
(0.97 from batch 3 to 6), so the tolerances (logits 1e-5, moments 1e-5 relative, losses and
proportions 1e-5 relative) sit 10-1000x above the noise and far below any real divergence.
Compared exactly (no tolerance): every sample of every batch, in order, and where each proportion
change starts.

Gradient clipping is turned off (a threshold never reached), so that a gradient of the wrong scale
(a sum over ranks taken for a mean, as gloo does with FSDP2's ReduceOp.AVG in torch 2.7) shows:
AdamW's update does not depend on a constant gradient scale, so the logits would not tell, but its
moments do, and they are compared too. With clipping every step the clipped gradients would agree
whatever the scale.

This file is also the script each rank runs: ``composer -n 2 tests/test_fsdp_dynamic.py OUT [--crash-at N]
YAML overrides...`` runs ``train.main`` and writes ``OUT/rank{R}.json``: the batch it started and
ended at, and the domain and a content hash of each sample of each completed train batch.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
YAML = "yamls/demo/pretrain.yaml"
BATCHES, CRASH_AT, EVAL_EVERY = 6, 3, 2
GLOBAL_BATCH, LOOKAHEAD = 16, 1
DOMAINS = ("code", "data", "docs", "reference")
TIMEOUT_S = 240


def _overrides(tmp: Path, data: Path, name: str) -> list[str]:
    return [
        f"variables.data_root={data}", f"run_name={name}", f"save_folder={tmp / name}",
        f"max_duration={BATCHES}ba", f"eval_interval={EVAL_EVERY}ba", f"save_interval={CRASH_AT}ba",
        f"global_train_batch_size={GLOBAL_BATCH}", "device_train_microbatch_size=8",
        f"train_loader.dataset.lookahead_batches={LOOKAHEAD}",
        "algorithms.gradient_clipping.clipping_threshold=1.0e9",  # off: see the module docstring
        "progress_bar=false", "log_to_console=false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    """The three runs; returns (tmp, {run name: per-rank records})."""
    from tests.helpers import sharded_crash_resume_and_single  # here: this file also runs as a rank's script

    tmp = tmp_path_factory.mktemp("fsdp_dynamic")
    records = sharded_crash_resume_and_single(__file__, YAML, lambda name: _overrides(tmp, demo_root, name), tmp,
                                              CRASH_AT, TIMEOUT_S, read=lambda path: json.loads(path.read_text()))
    for name, expected in (("first", "simulated crash"), ("resumed", None)):
        assert [r["error"] for r in records[name]] == [expected, expected]
    return tmp, records


def _logged(jsonl: Path, key_of) -> dict[int, dict[str, float]]:
    """{batch: {domain: value}} of the keys ``key_of(domain)`` in a JsonlLogger file (last value wins,
    as for a resumed run that logs a batch again)."""
    table: dict[int, dict[str, float]] = {}
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        for d in DOMAINS:
            if key_of(d) in record:
                table.setdefault(record["batch"], {})[d] = record[key_of(d)]
    return table


@pytest.mark.slow
def test_resumed_from_the_sharded_checkpoint_at_batch_3(runs):
    tmp, records = runs
    assert [(r["start_batch"], r["end_batch"]) for r in records["first"]] == [(0, CRASH_AT)] * 2
    assert [(r["start_batch"], r["end_batch"]) for r in records["resumed"]] == [(CRASH_AT, BATCHES)] * 2
    assert [sorted(map(int, r["batches"])) for r in records["resumed"]] == [[4, 5, 6]] * 2  # no batch redone
    folder = tmp / "fsdp" / f"ep0-ba{CRASH_AT}"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (tmp / "fsdp" / "latest-rank0.pt").resolve() == (tmp / "fsdp" / f"ep0-ba{BATCHES}").resolve()


@pytest.mark.slow
def test_same_samples_in_the_same_order_as_single_process(runs):
    """Rank r of 2 trains on global samples r, r + 2, ...; interleaved, the two ranks' batches are the
    single process's batches, sample for sample, across the crash and the resume."""
    _, records = runs
    ranks = [{**first["batches"], **resumed["batches"]} for first, resumed in zip(records["first"], records["resumed"])]
    single = records["single"][0]["batches"]
    assert sorted(map(int, single)) == list(range(1, BATCHES + 1))
    for batch in single:
        interleaved = [sample for pair in zip(ranks[0][batch], ranks[1][batch]) for sample in pair]
        assert interleaved == single[batch], f"batch {batch}"
    # the change after the batch-2 evaluation landed inside the run: `reference` (loss far above its
    # target) goes from a quarter of the mix to most of it
    share = {b: sum(d == DOMAINS.index("reference") for d, _ in single[str(b)]) for b in range(1, BATCHES + 1)}
    assert sum(share[b] for b in (4, 5, 6)) > 2 * sum(share[b] for b in (1, 2, 3)), share


@pytest.mark.slow
def test_same_proportions_as_single_process(runs):
    from llmhift.checkpoint.io import load_checkpoint

    tmp, _ = runs
    weights = {name: _logged(tmp / name / "metrics.jsonl", lambda d: f"metrics/train/{d}_weight")
               for name in ("fsdp", "single")}
    # logged when each fit starts and after each evaluation (2, 4, 6); the resumed fit starts at 3
    assert sorted(weights["single"]) == [0, 2, 4, 6], weights["single"]
    assert sorted(weights["fsdp"]) == [0, 2, 3, 4, 6], weights["fsdp"]
    assert weights["fsdp"][3] == weights["fsdp"][2]  # what the resumed run found in the checkpoint
    for batch in (0, 2, 4, 6):
        assert weights["fsdp"][batch] == pytest.approx(weights["single"][batch], rel=1e-5), batch
    assert weights["single"][2]["reference"] > 0.5 > weights["single"][0]["reference"]

    states = {name: load_checkpoint(tmp / name / "latest-rank0.pt")["state"] for name in ("fsdp", "single")}
    schedules = {name: s["dataset_state"]["train"]["schedule"] for name, s in states.items()}
    starts = [0, 3 * GLOBAL_BATCH, 5 * GLOBAL_BATCH, 7 * GLOBAL_BATCH]  # the initial mix, then evals 2, 4, 6
    assert [start for start, _ in schedules["fsdp"]] == [start for start, _ in schedules["single"]] == starts
    for (_, fsdp), (_, single) in zip(schedules["fsdp"], schedules["single"]):
        assert fsdp == pytest.approx(single, rel=1e-5)
    histories = [json.loads(s["callbacks"]["DynamicLoadingCallback"]["history"]) for s in states.values()]
    assert [h["first_sample"] for h in histories[0]] == [h["first_sample"] for h in histories[1]] == starts[1:]


@pytest.mark.slow
def test_same_eval_losses_as_single_process(runs):
    tmp, _ = runs
    losses = {name: _logged(tmp / name / "metrics.jsonl", lambda d: f"metrics/eval/{d}_LanguageCrossEntropy")
              for name in ("fsdp", "single")}
    assert sorted(losses["single"]) == [2, 4, 6]
    for batch in (2, 4, 6):
        assert losses["fsdp"][batch] == pytest.approx(losses["single"][batch], rel=1e-5), batch


@pytest.mark.slow
def test_same_optimizer_moments_as_single_process(runs):
    """The sharded checkpoint's AdamW moments, gathered, are the single process's: the ranks averaged
    their gradients (a sum would double exp_avg and quadruple exp_avg_sq)."""

    from llmhift.checkpoint.io import load_checkpoint

    tmp, _ = runs
    moments = {name: load_checkpoint(tmp / name / "latest-rank0.pt")["state"]["optimizers"]["DecoupledAdamW"]["state"]
               for name in ("fsdp", "single")}
    assert sorted(moments["fsdp"]) == sorted(moments["single"])
    for param, single in moments["single"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            fsdp = moments["fsdp"][param][key]
            assert fsdp.shape == single[key].shape, (param, key)
            relative = ((fsdp - single[key]).norm() / single[key].norm()).item()
            assert relative < 1e-5, (param, key, relative)


@pytest.mark.slow
def test_same_hf_logits_as_single_process(runs):
    import torch
    from transformers import AutoModelForCausalLM

    from llmhift.convert.composer_to_hf import save_composer_to_hf

    tmp, _ = runs
    input_ids = torch.arange(2 * 64).reshape(2, 64) * 7 % 2048  # (2, 64) tokens of the demo vocabulary
    logits = {}
    for name in ("fsdp", "single"):
        out = save_composer_to_hf(tmp / name / "latest-rank0.pt", tmp / "hf" / name)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits[name] = model(input_ids).logits  # (2, 64, 2048)
    diff = (logits["fsdp"] - logits["single"]).abs().max().item()
    assert diff < 1e-5, diff


def _rank_main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO_ROOT))
    from composer import Callback
    from composer.utils import dist

    from tests.helpers import run_train_main

    class RecordSamples(Callback):
        """The domain and a content hash of each sample of each completed train batch."""

        def __init__(self) -> None:
            self.batches: dict[str, list] = {}
            self._pending: list = []

        def after_dataloader(self, state, logger) -> None:
            batch = state.batch
            self._pending = [[int(d), hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:16]]
                             for d, ids in zip(batch["domain_idx"], batch["input_ids"])]

        def batch_end(self, state, logger) -> None:
            self.batches[str(int(state.timestamp.batch))] = self._pending

    out, recorder = Path(argv[0]), RecordSamples()
    record, exit_code = run_train_main(argv[1:], setup=lambda trainer: trainer.state.callbacks.append(recorder))
    record["batches"] = recorder.batches
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_global_rank()}.json").write_text(json.dumps(record))
    return exit_code


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
