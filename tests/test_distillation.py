"""DistillationCallback: the loss against torch's kl_div, its memory, and real train.py runs (alpha 0 is
the LM-only run bit for bit, a teacher equal to the student gives KL 0, resume equals uninterrupted,
per-domain eval stays the student's LM loss), the teacher's tokenizer checks, and FSDP2 on 2 CPU ranks.

The teacher and student are tiny random LLaMAs saved with transformers' ``save_pretrained`` beside the
demo tokenizer: the teacher has the demo pretraining shape, the student the demo pruning target.

This file is also the script each rank of the FSDP2 test runs: ``composer -n 2 tests/test_distillation.py
OUT YAML overrides...`` runs ``train.main`` and writes ``OUT/rank{R}.json`` (what the teacher's parameters
are on that rank); the losses come from rank 0's metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
YAML = "yamls/demo/continue_distill.yaml"
LM_ONLY_YAML = "yamls/demo/continue.yaml"  # the same yaml without callbacks.distillation
BATCHES = 4
FSDP_TIMEOUT_S = 240
TEACHER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=352)
STUDENT = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, intermediate_size=176)


@pytest.fixture(scope="module")
def models(demo_root, tmp_path_factory) -> dict[str, Path]:
    from tests.helpers import save_hf_llama

    root = tmp_path_factory.mktemp("distill_models")
    return {"teacher": save_hf_llama(root / "teacher", demo_root / "tokenizer", 0, **TEACHER),
            "student": save_hf_llama(root / "student", demo_root / "tokenizer", 1, **STUDENT)}


def _overrides(data: Path, models: dict[str, Path], folder: Path, *extra: str) -> list[str]:
    return [
        f"variables.data_root={data}", f"variables.teacher={models['teacher']}",
        f"variables.pruned_model={models['student']}", f"save_folder={folder}", f"max_duration={BATCHES}ba",
        f"eval_interval={BATCHES}ba", f"save_interval={BATCHES // 2}ba", "global_train_batch_size=8",
        "device_train_microbatch_size=4", "device_eval_batch_size=8", "eval_subset_num_batches=1",
        "progress_bar=false", "log_to_console=false", *extra,
    ]  # fmt: skip


def _metrics(folder: Path) -> dict[str, dict[int, float]]:
    """Every logged value, {key: {batch: value}}, from the run's metrics.jsonl."""
    values: dict[str, dict[int, float]] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        batch = record.pop("batch")
        for key, value in record.items():
            values.setdefault(key, {})[batch] = value
    return values


def test_loss_and_gradient_equal_kl_div_on_the_full_logits():
    """float64 so that only the chunking could make a difference; some targets ignored (-100)."""
    import torch
    import torch.nn.functional as F

    from llmhift.callbacks.distillation import distillation_loss

    torch.manual_seed(0)
    student = torch.randn(3, 7, 50, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, 50, dtype=torch.float64)
    labels = torch.randint(50, (3, 7))
    labels[0, :3] = -100  # a prompt, say
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # next_token_targets' convention: the last position predicts nothing
    counted = targets != -100
    temperature = 2.0
    log_s = F.log_softmax(student[counted] / temperature, dim=-1)  # (n, V), the unchunked reference
    log_t = F.log_softmax(teacher[counted] / temperature, dim=-1)
    references = {
        "kl": F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2,  # KL(t || s)
        "reverse_kl": F.kl_div(log_t, log_s, log_target=True, reduction="batchmean") * temperature**2,
    }
    teacher_ce = F.cross_entropy(teacher[counted], targets[counted])
    for loss, reference in references.items():
        kl, ce = distillation_loss(student, teacher, targets, temperature, loss, chunk_tokens=4)  # 6 chunks of 21 rows
        (grad,) = torch.autograd.grad(kl, student)
        (expected_grad,) = torch.autograd.grad(reference, student, retain_graph=True)  # both share log_s
        torch.testing.assert_close(kl, reference, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ce, teacher_ce, rtol=1e-14, atol=1e-14)
    assert references["kl"] > 0.1 and not torch.allclose(references["kl"], references["reverse_kl"])


def test_kl_memory_stays_below_one_full_fp32_copy_of_both_logits(tmp_path):
    """Peak RSS above the two bf16 logit tensors (2048 x 8192: 32 MiB each), forward and backward, in a
    fresh process (VmHWM reset through /proc/self/clear_refs). The docstring's bound: the gradient
    buffer (bf16, 32 MiB; it becomes the logits' .grad) plus ~8 fp32 rows of chunk x V (16 MiB); both
    logits in fp32 at once would be 128 MiB, and the unchunked KL measures ~480 MiB here."""
    script = tmp_path / "peak.py"
    script.write_text(
        "import re, torch\n"
        "from llmhift.callbacks.distillation import distillation_loss\n"
        "def rss(key):\n"
        "    return int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "torch.manual_seed(0)\n"
        "s = torch.randn(1, 2048, 8192).bfloat16().requires_grad_(); t = torch.randn(1, 2048, 8192).bfloat16()\n"
        "y = torch.randint(8192, (1, 2048))\n"
        "distillation_loss(s[:, :8], t[:, :8], y[:, :8], 1.0, 'kl', 64)[0].backward(); s.grad = None\n"
        "base = rss('VmRSS'); open('/proc/self/clear_refs', 'w').write('5')\n"
        "distillation_loss(s, t, y, 1.0, 'kl', 64)[0].backward()\n"
        "print(rss('VmHWM') - base)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    extra_mib = int(done.stdout.split()[-1]) / 2**20
    print(f"KL peak above the logits: {extra_mib:.1f} MiB")
    assert 32 <= extra_mib < 2 * 2048 * 8192 * 4 / 2**20  # at least the buffer, below both logits in fp32


def test_alpha_0_is_the_lm_only_run_and_a_teacher_equal_to_the_student_gives_kl_0(demo_root, models, tmp_path):
    """alpha 0 with the student as its own teacher: the same losses, bit for bit, as without the callback;
    the KL at step 0 is exactly 0 (the same weights, the same batch), and not after the student moved."""
    import torch

    import train

    same = {**models, "teacher": models["student"]}
    plain = _overrides(demo_root, same, tmp_path / "plain")
    distilled = _overrides(demo_root, same, tmp_path / "alpha0", "callbacks.distillation.alpha=0")
    assert train.main([LM_ONLY_YAML, *plain]) == 0
    assert train.main([YAML, *distilled]) == 0
    without, with_ = _metrics(tmp_path / "plain"), _metrics(tmp_path / "alpha0")
    assert with_["loss/train/total"] == without["loss/train/total"] and len(without["loss/train/total"]) == BATCHES
    assert with_["metrics/eval/LanguageCrossEntropy"] == without["metrics/eval/LanguageCrossEntropy"]
    assert with_["distill/kl"][0] == 0.0 and with_["distill/kl"][BATCHES - 1] > 1e-6  # 1.9e-5 after 3 warm-up steps
    assert with_["distill/lm"] == with_["loss/train/total"]  # alpha 0: the loss is the LM loss
    a = torch.load(tmp_path / "plain" / "latest-rank0.pt", weights_only=False)["state"]["model"]
    b = torch.load(tmp_path / "alpha0" / "latest-rank0.pt", weights_only=False)["state"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted_and_eval_is_the_students_lm_loss(demo_root, models, tmp_path):
    """alpha 0.5 with dynamic loading: a run crashed after batch 2 and resumed logs the uninterrupted
    run's losses; the per-domain eval CE is the student's own, recomputed here from its weights."""
    import torch

    from llmhift.models.causal_lm import causal_lm_loss, next_token_targets
    from tests.helpers import run_train_main

    mix = "callbacks.distillation.alpha=0.5"
    trainers = []
    whole = _overrides(demo_root, models, tmp_path / "whole", mix)
    assert run_train_main([YAML, *whole], setup=trainers.append)[1] == 0
    crashed = _overrides(demo_root, models, tmp_path / "resumed", mix)
    record, code = run_train_main(["--crash-at", str(BATCHES // 2), YAML, *crashed])
    assert (code, record["error"], record["end_batch"]) == (0, "simulated crash", BATCHES // 2)
    record, code = run_train_main([YAML, *crashed, "autoresume=true"])
    assert (code, record["start_batch"], record["end_batch"]) == (0, BATCHES // 2, BATCHES)

    whole_log, resumed_log = _metrics(tmp_path / "whole"), _metrics(tmp_path / "resumed")
    for key in ("loss/train/total", "distill/kl", "distill/lm", "distill/teacher_ce"):
        assert len(whole_log[key]) == BATCHES
        assert resumed_log[key] == whole_log[key], key
    for b in range(BATCHES):  # the loss really is the mix
        mixed = 0.5 * whole_log["distill/kl"][b] + 0.5 * whole_log["distill/lm"][b]
        assert whole_log["loss/train/total"][b] == pytest.approx(mixed, rel=1e-6)

    state = trainers[0].state
    batch = next(iter(state.evaluators[0].dataloader.dataloader))  # eval_subset_num_batches=1: this batch
    with torch.no_grad():
        logits = state.model(batch)
    targets = next_token_targets(batch)
    domains = ["code", "data", "docs", "reference"]
    present = sorted(set(batch["domain_idx"].tolist()))
    assert present
    for d in present:
        rows = batch["domain_idx"] == d
        expected = causal_lm_loss(logits[rows], targets[rows]).item()
        logged = whole_log[f"metrics/eval/{domains[d]}_LanguageCrossEntropy"][BATCHES]
        assert logged == pytest.approx(expected, rel=1e-5), domains[d]


def _copy_with(folder: Path, to: Path, file: str, edit) -> Path:
    shutil.copytree(folder, to)
    (to / file).write_text(edit((to / file).read_text()))
    return to


@pytest.mark.parametrize("case", ["tokenizer", "vocab", "missing", "alpha"])
def test_a_wrong_teacher_or_setting_is_one_line_before_anything_is_written(case, demo_root, models, tmp_path, capsys):
    import train

    teacher, extra = models["teacher"], []
    if case == "tokenizer":  # the same vocabulary size, another token at id 5
        teacher = _copy_with(teacher, tmp_path / "t", "tokenizer.json", lambda text: text.replace('"<', '"<x', 1))
    elif case == "vocab":
        teacher = _copy_with(teacher, tmp_path / "t", "config.json",
                             lambda text: re.sub(r'"vocab_size": \d+', '"vocab_size": 4096', text))
    elif case == "missing":
        teacher = tmp_path / "nowhere"
    else:
        extra = ["callbacks.distillation.alpha=1.5"]
    folder = tmp_path / "run"
    args = _overrides(demo_root, {**models, "teacher": teacher}, folder, *extra)
    assert train.main([YAML, *args]) == 2
    err = capsys.readouterr().err.strip()
    expected = {
        "tokenizer": r"callbacks\.distillation\.teacher: .*tokenizer differs from the student's .*\['tokenizer\.json'\]; "
                     r"distil only from a teacher with the student's tokenizer",
        "vocab": r"callbacks\.distillation\.teacher: .* has a 4096-token vocabulary, the student 2048; distil only",
        "missing": r"callbacks\.distillation\.teacher: .*nowhere does not exist",
        "alpha": r"callbacks\.distillation: callbacks\.distillation\.alpha: must be in \[0, 1\]",
    }[case]
    assert len(err.splitlines()) == 1 and re.fullmatch(f"error: {expected}.*", err), err
    assert not folder.exists()


def test_dry_run_adds_the_teachers_weights_and_working_memory(tmp_path, capsys):
    """The 1.3B recipe against the LM-only one on 16 ranks, a LLaMA-2-7B teacher (its config.json alone):
    the estimate grows by the teacher's fp32 weights / 16, its logits and the KL's gradient buffer
    (16 x 4096 x 32000 bf16 each), one fp32 KL chunk (8 x 512 x 32000) and the teacher's gathered
    root unit and two blocks (bf16), as written out here from the 7B shape."""
    import train
    from tests.helpers import config_only_model

    teacher = config_only_model(tmp_path / "llama-2-7b")
    totals = {}
    for yaml, extra in (("yamls/pretrain/llama2_1.3b.yaml", []),
                        ("yamls/pretrain/llama2_1.3b_distill.yaml", [f"variables.teacher={teacher}"])):
        assert train.main([yaml, *extra, "--dry-run", "--world-size", "16"]) == 0
        out = capsys.readouterr().out
        totals[yaml] = float(re.search(r"^  total +([\d.]+) GiB", out, re.M).group(1))
    assert "+ teacher 6,738,415,616, fp32 / 16 ranks" in out
    block = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two norms
    outer = 2 * 32000 * 4096 + 4096  # embedding, head, final norm
    assert 32 * block + outer == 6_738_415_616
    logits = 16 * 4096 * 32000 * 2
    expected = (32 * block + outer) * 4 / 16 + 2 * logits + 8 * 512 * 32000 * 4 + (outer + 2 * block) * 2
    delta = totals["yamls/pretrain/llama2_1.3b_distill.yaml"] - totals["yamls/pretrain/llama2_1.3b.yaml"]
    assert delta == pytest.approx(expected / 2**30, abs=0.011)  # the printout rounds each total to 0.01 GiB


@pytest.mark.slow
def test_fsdp2_on_2_ranks_shards_the_teacher_and_trains_like_one_process(demo_root, models, tmp_path):
    """Two ranks (train.py's FSDP2, one micro-batch of 4 each) against one process (two micro-batches of 4):
    the same losses and KL per batch up to float summation order, and each rank holds half the
    teacher's elements (sharded DTensors, not a replica)."""
    from tests.helpers import launch_ranks, rank_logs

    args = _overrides(demo_root, models, tmp_path / "fsdp", "fsdp_config={sharding_strategy: FULL_SHARD}",
                      "callbacks.distillation.alpha=0.5")
    process = launch_ranks(__file__, [str(tmp_path / "out"), YAML, *args], tmp_path / "logs", FSDP_TIMEOUT_S)
    assert process.returncode == 0, process.stdout[-4000:] + rank_logs(tmp_path / "logs")
    single = _overrides(demo_root, models, tmp_path / "single", "callbacks.distillation.alpha=0.5")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "FSDP_VERSION")}
    done = subprocess.run([sys.executable, __file__, str(tmp_path / "out_single"), YAML, *single], cwd=REPO_ROOT,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=FSDP_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    one = json.loads((tmp_path / "out_single" / "rank0.json").read_text())
    assert one["teacher"]["dtensors"] == 0
    assert [(r["teacher"]["unsharded"], r["teacher"]["tensors"]) for r in ranks] == [([], one["teacher"]["tensors"])] * 2
    assert ranks[0]["teacher"]["local"] + ranks[1]["teacher"]["local"] == one["teacher"]["local"]
    assert max(r["teacher"]["local"] for r in ranks) < 0.6 * one["teacher"]["local"]
    fsdp, single_log = _metrics(tmp_path / "fsdp"), _metrics(tmp_path / "single")
    for key in ("loss/train/total", "distill/kl", "distill/lm", "distill/teacher_ce"):
        assert sorted(fsdp[key]) == sorted(single_log[key]) == list(range(BATCHES)), key
        for b in range(BATCHES):
            assert fsdp[key][b] == pytest.approx(single_log[key][b], rel=1e-5, abs=1e-6), (key, b)


def _rank_main(out: Path, argv: list[str]) -> int:
    """One rank of the FSDP2 test: train, then record what the teacher's parameters are here."""
    from composer.utils import dist
    from torch.distributed.tensor import DTensor

    from llmhift.callbacks.distillation import DistillationCallback
    from tests.helpers import run_train_main

    trainers = []
    record, code = run_train_main(argv, setup=trainers.append)
    callback = next(c for c in trainers[0].state.callbacks if isinstance(c, DistillationCallback))
    params = list(callback.teacher.parameters())
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    record["teacher"] = {"tensors": len(params), "dtensors": sum(isinstance(p, DTensor) for p in params),
                         "local": sum(t.numel() for t in local),
                         "unsharded": [n for n, p in callback.teacher.named_parameters() if not isinstance(p, DTensor)]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_global_rank()}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(_rank_main(Path(sys.argv[1]), sys.argv[2:]))
