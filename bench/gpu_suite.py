"""Every GPU figure issue 19 asks for, in one command: prints a table and one JSON (also ``--out``).

    python bench/gpu_suite.py [--out suite.json]     # one GPU, real shapes, random weights, no download
    python bench/gpu_suite.py --device cpu --tiny    # the same code paths at tiny shapes (CI runs this)

Cases, each measured on this device in one run:

- ``throughput``: ComposerLlama vs transformers' LlamaForCausalLM with the same weights, bf16,
  forward + backward tokens/s and MFU (llmhift.build.throughput's FLOPs count and peak) at a LLaMA
  1.3B shape, seq 2048; for sdpa and, when the flash-attn package is installed, flash attention.
- ``plain`` / ``masked``: a real Composer Trainer fit of the 1.3B shape, plain and with the pruning
  callback's L0 module over all six mask types (PRUNING_MODULES): median step time and their ratio.
- ``hift`` / ``full``: the LLaMA-2-7B shape, bf16 weights (HiFT's ``param_dtype``), AdamW, seq 512 x
  micro-batch 3: HiFT is fitted (peak ``torch.cuda.max_memory_allocated`` and step time); full
  fine-tuning is only estimated (it does not fit the GPUs HiFT targets).
- every fitted case's ``train.py --dry-run`` estimate (llmhift.build.memory.estimate_run on the same
  TrainConfig) next to the measured peak, as measured / estimated.

On a CPU there is no allocator peak: the peaks and ratios are null, the rest is measured.

The lent GPU machines have their own torch and transformers but lack Composer and its pure-Python
dependencies: README's "GPU validation kit" says which wheels to carry (the shared tool's, with
importlib_metadata 8.9.0 in place of 10.x, and transformers 4.57.6 to measure against the pinned one)
and how to install them there. Measured on an H200: the README's table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger
from timing import wall_seconds  # bench/timing.py: scripts here run with bench/ on sys.path
from torch.utils.data import DataLoader, Dataset

from llmhift.build.config import TrainConfig, config_from_dict
from llmhift.build.memory import ModelShape, estimate_run
from llmhift.build.throughput import PEAK_BF16_FLOPS, flops_per_token
from llmhift.build.trainer import build_callbacks, build_model, build_optimizer
from llmhift.models.hf_adapter import hf_to_llmhift_state_dict, llama_config_from_hf
from llmhift.models.l0_module import PRUNING_MODULES
from llmhift.models.llama import ComposerLlama

MiB = 2**20
# LLaMA 1.3B (Sheared-LLaMA's target) and LLaMA-2-7B; tiny stand-ins of each for CPU runs.
SHAPES = {
    "1.3b": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, intermediate_size=5504),
    "7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008),
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=128),
}
PRUNED_TARGET = {"1.3b": dict(d_model=1024, n_heads=8, n_layers=12, intermediate_size=2752),
                 "tiny": dict(d_model=32, n_heads=2, n_layers=1, intermediate_size=64)}


class StepTimer(Callback):
    """Wall time of every training batch, the GPU synchronised at both ends."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._sync()
        self._start = time.perf_counter()

    def after_train_batch(self, state: State, logger: Logger) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)


class RandomTokens(Dataset):
    def __init__(self, vocab: int, seq_len: int, count: int) -> None:
        self.ids = torch.randint(0, vocab, (count, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def case_config(shape: dict, seq_len: int, batch: int, steps: int, precision: str, *,
                target: dict | None = None, hift: bool = False) -> TrainConfig:
    """A TrainConfig like a yaml's, so the dry run's estimate and the fit see the same settings."""
    model: dict[str, Any] = {"name": "llama", **shape, "max_seq_len": seq_len}
    callbacks: dict[str, Any] = {}
    if target:
        model["l0_module"] = {"pruning_modules": list(PRUNING_MODULES), "target_model": target}
        callbacks["pruning"] = {}
    if hift:
        callbacks["hift"] = {"group_element": 1, "optimizer_state": "keep", "param_dtype": "bfloat16"}
    return config_from_dict({
        "model": model, "callbacks": callbacks, "precision": precision, "max_duration": f"{steps}ba",
        "train_loader": {"dataset": {"local": "unused", "max_seq_len": seq_len}},
        "global_train_batch_size": batch, "device_train_microbatch_size": batch,
        "optimizer": {"name": "adamw" if hift else "decoupled_adamw", "lr": 1e-5, "lag_lr": 0.1},
    })


def fit_case(config: TrainConfig, device: str, steps: int, fitted: bool = True) -> dict[str, Any]:
    """Fits ``config`` with a real Trainer (``fitted``) and puts the dry run's estimate beside it."""
    with torch.device("cpu" if fitted else "meta"):  # an estimate reads only the counts
        model = build_model(config)
    shape = ModelShape.from_llama(model.config)
    estimate = estimate_run(config, model, shape, world_size=1)
    result: dict[str, Any] = {"estimate_mib": round(estimate.total / MiB, 1)}
    if not fitted:
        return result
    callbacks, timer = build_callbacks(config), StepTimer()
    seq_len = config.train_loader.dataset.max_seq_len
    data = RandomTokens(shape.vocab_size, seq_len, config.global_train_batch_size * steps)
    baseline = 0
    if device == "cuda":  # what an earlier case left allocated is not this case's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    trainer = Trainer(model=model, optimizers=build_optimizer(config, model), callbacks=[*callbacks, timer],
                      train_dataloader=DataLoader(data, batch_size=config.global_train_batch_size),
                      max_duration=config.max_duration, device="gpu" if device == "cuda" else "cpu",
                      precision=config.precision, progress_bar=False, log_to_console=False)
    trainer.fit()
    peak = torch.cuda.max_memory_allocated() - baseline if device == "cuda" else None
    trainer.close()
    del trainer, model, callbacks
    gc.collect()  # a callback holding the State keeps the model and its optimizer state on the GPU
    result.update(step_s=round(statistics.median(timer.times[1:] or timer.times), 4),
                  peak_mib=None if peak is None else round(peak / MiB, 1),
                  measured_over_estimate=None if peak is None else round(peak / estimate.total, 3))
    return result


def throughput(shape: dict, seq_len: int, batch: int, reps: int, attn: str, device: str, dtype: torch.dtype) -> dict:
    """Forward + backward tokens/s of ours and HF's LLaMA on the same weights, alternating who goes first."""
    hf_config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=seq_len,
        attn_implementation="flash_attention_2" if attn == "flash_attn" else "sdpa")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).to(dtype)
    config = llama_config_from_hf(hf_config.to_dict())
    config.attn_impl = attn
    ours = ComposerLlama(config).to(dtype)
    ours.load_state_dict(hf_to_llmhift_state_dict(hf.state_dict(), config.tie_word_embeddings))
    ours, hf = ours.to(device).train(), hf.to(device).train()
    ids = torch.randint(0, shape["vocab_size"], (batch, seq_len), device=device)
    batch_dict = {"input_ids": ids, "labels": ids}

    def ours_step() -> None:
        ours.zero_grad(set_to_none=True)
        ours.loss(ours(batch_dict), batch_dict).backward()

    def hf_step() -> None:
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids, labels=ids).loss.backward()

    ours_step()
    hf_step()
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    order = [("ours", ours_step), ("hf", hf_step)]
    for rep in range(reps):
        for name, run in order if rep % 2 == 0 else reversed(order):
            times[name].append(wall_seconds(run, torch.device(device)))
    tokens = batch * seq_len
    flops = flops_per_token(ModelShape.from_llama(config), seq_len)
    peak = gpu_peak_flops(device)
    result: dict[str, Any] = {}
    for name, samples in times.items():
        tps = tokens / statistics.median(samples)
        result[f"{name}_tokens_per_s"] = round(tps, 1)
        result[f"{name}_mfu"] = None if peak is None else round(tps * flops / peak, 3)
    result["ours_over_hf"] = round(result["ours_tokens_per_s"] / result["hf_tokens_per_s"], 3)
    return result


def gpu_peak_flops(device: str) -> float | None:
    """The card's dense bf16 peak when it is one PEAK_BF16_FLOPS names (else no MFU is claimed)."""
    name = torch.cuda.get_device_name().lower() if device == "cuda" else ""
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def table(report: dict) -> str:
    rows = [f"{'case':<22}{'figure':<26}value"]
    for case, figures in report["cases"].items():
        for key, value in figures.items():
            rows.append(f"{case:<22}{key:<26}{value}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU CI)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    small, big = ("tiny", "tiny") if args.tiny else ("1.3b", "7b")
    seq_len, seq_hift = (32, 32) if args.tiny else (2048, 512)
    steps = 3 if args.tiny else 6
    precision = "amp_bf16" if args.device == "cuda" else "fp32"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cases: dict[str, dict] = {}
    report = {
        "bench": "gpu_suite", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny,
        "pruning_modules": list(PRUNING_MODULES), "cases": cases,
    }

    def measure(name: str, case: Callable[[], dict]) -> None:
        """One case; a failure is recorded and the others still run (a GPU is lent for minutes, once)."""
        print(f"[gpu_suite] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            cases[name] = case()
        except Exception as err:  # noqa: BLE001 - reported in the JSON and the exit status
            cases[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        print(f"[gpu_suite] {name} {time.perf_counter() - start:.0f}s: {cases[name]}", file=sys.stderr, flush=True)
        if args.out:  # what is measured survives a later case's crash or a time limit
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    attns = ["sdpa"] + (["flash_attn"] if args.device == "cuda" and importlib.util.find_spec("flash_attn") else [])
    for attn in attns:
        measure(f"throughput_{attn}", lambda: throughput(SHAPES[small], seq_len, 2 if args.tiny else 4,
                                                         3 if args.tiny else 6, attn, args.device, dtype))
    measure("plain", lambda: fit_case(case_config(SHAPES[small], seq_len, 2, steps, precision), args.device, steps))
    measure("masked", lambda: fit_case(case_config(SHAPES[small], seq_len, 2, steps, precision,
                                                   target=PRUNED_TARGET[small]), args.device, steps))
    if "step_s" in cases["plain"] and "step_s" in cases["masked"]:
        cases["masked"]["masked_over_plain"] = round(cases["masked"]["step_s"] / cases["plain"]["step_s"], 3)
    measure("hift_7b", lambda: fit_case(case_config(SHAPES[big], seq_hift, 3, steps, precision, hift=True),
                                        args.device, steps))
    measure("full_7b", lambda: fit_case(case_config(SHAPES[big], seq_hift, 3, steps, precision), args.device, steps,
                                        fitted=False))
    print(table(report))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if any("error" in figures for figures in cases.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
