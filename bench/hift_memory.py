"""Peak memory and step time of HiFT vs full fine-tuning of the same model, side by side; prints JSON.

    python bench/hift_memory.py [--optimizer adamw] [--layers 12] [--d-model 768] [--batch-size 2] [--seq-len 128]
                                [--steps 18] [--settings hift_keep hift_reset ...]
    python bench/hift_memory.py --peers [bench/hift_peers.py's flags]   # llmhift vs BAdam instead

``--optimizer``: an ``optimizer.name`` that runs on a CPU (sgd with momentum 0.9), the same for every
setting, full fine-tuning included.

Each setting runs in its own fresh process (peak RSS is a per-process high-water mark) with the same
model, data and seed. Reported per setting:

- ``peak_rss_mb``: the process's peak resident memory above what it held right before the model was
  built (weights, gradients, optimizer state wherever it lives, activations).
- ``peak_optimizer_state_mb``: the largest amount of optimizer state held in ``optimizer.state`` at
  any step, by tensor accounting: on a GPU this is what sits on the accelerator (HiFT parks the rest
  in host memory, which on a CPU machine is the same memory, so it still counts in ``peak_rss_mb``).
- ``peak_model_state_mb``: the largest sum, at the end of a step, of weights, gradients, optimizer
  state in ``optimizer.state`` and HiFT's fp32 master copies: what an accelerator would hold besides
  activations (parked state excluded).
- ``step_s``: median wall time of a training step after the first cycle.
Ratios are HiFT / full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "full": None,
    "hift_keep": {"optimizer_state": "keep"},
    "hift_reset": {"optimizer_state": "reset"},
    "hift_keep_bf16_weights": {"optimizer_state": "keep", "param_dtype": "bfloat16"},
    "hift_keep_offload": {"optimizer_state": "keep", "offload_dir": "<a temporary folder>"},
}


def _cpu_optimizers() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llmhift.build.optimizers import OPTIMIZERS

    return [name for name, spec in OPTIMIZERS.items() if not spec.gpu_only]


def _optimizer(name: str):
    from llmhift.build.config import OptimizerConfig

    return OptimizerConfig(name=name, lr=1e-4, momentum=0.9 if name == "sgd" else None)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_one(name: str, layers: int, d_model: int, batch_size: int, seq_len: int, steps: int, optimizer: str) -> dict:
    import torch
    from composer import Callback, Trainer
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llmhift.build.optimizers import make_optimizer
    from llmhift.callbacks.hift import HiFTCallback
    from llmhift.models.llama import ComposerLlama

    torch.manual_seed(0)
    torch.set_num_threads(2)
    baseline = _rss_mb()
    model = ComposerLlama(dict(vocab_size=2048, d_model=d_model, n_layers=layers, n_heads=8,
                               intermediate_size=int(d_model * 8 / 3) // 64 * 64, max_seq_len=seq_len))
    data = [{"input_ids": torch.randint(2048, (seq_len,))} for _ in range(batch_size * steps)]

    class Measure(Callback):
        def __init__(self) -> None:
            self.times, self.state_bytes, self.model_state_bytes = [], 0, 0

        def batch_start(self, state, logger) -> None:
            self.start = time.perf_counter()

        def batch_end(self, state, logger) -> None:
            self.times.append(time.perf_counter() - self.start)
            held = _bytes(t for s in state.optimizers[0].state.values() for t in s.values() if torch.is_tensor(t))
            params = list(state.model.parameters())
            grads = [p.grad for p in params if p.grad is not None]
            masters = [] if hift is None else list(hift._master.values())  # private: what bf16 mode adds
            self.state_bytes = max(self.state_bytes, held)
            self.model_state_bytes = max(self.model_state_bytes, held + _bytes(params) + _bytes(grads) + _bytes(masters))

    settings = dict(SETTINGS[name] or {})
    if "offload_dir" in settings:
        settings["offload_dir"] = tempfile.mkdtemp(prefix="hift-offload-")
    hift = HiFTCallback(**settings) if settings else None
    measure = Measure()
    callbacks = [measure] if hift is None else [hift, measure]
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=batch_size),
                      optimizers=make_optimizer(_optimizer(optimizer), model.parameters()), max_duration=f"{steps}ba",
                      device="cpu", precision="fp32", callbacks=callbacks, progress_bar=False, log_to_console=False)
    trainer.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    warm = measure.times[layers + 3:] or measure.times
    return {"peak_rss_mb": round(peak - baseline, 1), "peak_optimizer_state_mb": round(measure.state_bytes / 2**20, 3),
            "peak_model_state_mb": round(measure.model_state_bytes / 2**20, 1),
            "step_s": round(statistics.median(warm), 4), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main() -> None:
    if "--peers" in sys.argv[1:]:  # the peer arms (BAdam) live in bench/hift_peers.py, with its own flags
        argv = [a for a in sys.argv[1:] if a != "--peers"]
        raise SystemExit(subprocess.call([sys.executable, str(Path(__file__).with_name("hift_peers.py")), *argv]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--optimizer", default="adamw", choices=_cpu_optimizers())
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="the settings to run (full fine-tuning always runs: the ratios' reference)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.layers, args.d_model, args.batch_size, args.seq_len, args.steps,
                                 args.optimizer)))
        return
    results = {}
    for name in dict.fromkeys(["full", *args.settings]):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--layers", str(args.layers), "--d-model",
                              str(args.d_model), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                              "--steps", str(args.steps), "--optimizer", args.optimizer], capture_output=True, text=True,
                             check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    full = results["full"]
    ratios = {name: {"peak_rss": round(r["peak_rss_mb"] / full["peak_rss_mb"], 3),
                     "peak_optimizer_state": round(r["peak_optimizer_state_mb"] / full["peak_optimizer_state_mb"], 3),
                     "peak_model_state": round(r["peak_model_state_mb"] / full["peak_model_state_mb"], 3),
                     "step_time": round(r["step_s"] / full["step_s"], 3)}
              for name, r in results.items() if name != "full"}
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "optimizer": args.optimizer, "layers": args.layers, "d_model": args.d_model, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "results": results,
                      "ratio_vs_full": ratios}, indent=2))


if __name__ == "__main__":
    main()
