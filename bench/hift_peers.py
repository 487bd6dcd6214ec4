"""llmhift's HiFT callback vs BAdam's BlockOptimizer on the same model, data and block schedule; prints JSON.

    python bench/hift_peers.py [--layers 12] [--d-model 768] [--batch-size 2] [--seq-len 128] [--steps 18]
                               [--switch-every 3] [--repeats 3] [--tiny] [--offline] [--peers-dir DIR]

The peer is installed on demand into ``--peers-dir`` (default ``~/.cache/llmhift-bench/peers``) with
``pip install --target DIR --no-deps badam==1.4``: never a dependency of llmhift, never in the venv.
With ``--offline`` nothing is installed and a missing peer is skipped with a message naming the
command that installs it. The HiFT authors' own package (PyPI ``HiFT`` 0.0.5) cannot be an arm on the
pinned stack: its layer switching lives in ``hift.trainer.HiFTrainer`` (``update_parameter_state``),
and that module does not import here: it needs ``deepspeed`` (not in the stack) and two names that
transformers 4.57 no longer has (``is_torch_tpu_available``, ``pytorch_utils.is_torch_less_than_1_11``).
Only its grouping (``hift.registerCallBack``) would import, and a loop that re-implements the switch
around it would measure this script's code, not the peer's.

Arms, each run in its own fresh process, interleaved (every arm once per round) for ``--repeats``
rounds, medians reported:

- ``llmhift_reset``: a Composer Trainer with ``HiFTCallback(optimizer_state='reset',
  switch_every=K, strategy='up2down')``: BAdam's schedule (a fresh Adam state at each switch).
- ``badam``: a plain loop with ``badam.BlockOptimizer(AdamW, switch_block_every=K,
  switch_mode='descending')`` over the same units (embedding, each block, norm, head) as blocks.
- ``llmhift_keep``: HiFT itself (K = 1, state kept), for reference.

Per arm: ``peak_rss_mb`` above the process's memory before the model, ``peak_optimizer_state_mb``
(tensors in the optimizer's state at the end of a step; BAdam also counts its fp32 copies of the
active block), ``step_s`` (median after two warm-up steps) and its breakdown ``forward_s`` (to the
loss), ``backward_s``, ``optimizer_s`` (the step, BAdam's switch included) and ``callback_s``
(llmhift's switch and learning-rate hold at batch start). Ratios are llmhift_reset / badam.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("llmhift_reset", "badam", "llmhift_keep")
PEER_PACKAGES = {"badam": "badam==1.4"}
PARTS = ("step_s", "forward_s", "backward_s", "optimizer_s", "callback_s")
DEFAULT_PEERS_DIR = Path.home() / ".cache" / "llmhift-bench" / "peers"
TINY = dict(layers=2, d_model=64, batch_size=2, seq_len=32, steps=8, switch_every=2, repeats=1)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _state_bytes(states, extra=()) -> int:
    import torch

    tensors = [t for s in states for t in s.values() if torch.is_tensor(t)] + list(extra)
    return sum(t.numel() * t.element_size() for t in tensors)


def _model(args):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llmhift.models.llama import ComposerLlama

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = ComposerLlama(dict(vocab_size=2048, d_model=args.d_model, n_layers=args.layers, n_heads=8,
                               intermediate_size=int(args.d_model * 8 / 3) // 64 * 64, max_seq_len=args.seq_len))
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(2048, (args.seq_len,), generator=generator)}
            for _ in range(args.batch_size * args.steps)]
    return model, data


def _summary(times: dict[str, list[float]], state_bytes: int, baseline: float, loss: float) -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss_mb": round(peak - baseline, 1), "peak_optimizer_state_mb": round(state_bytes / 2**20, 2),
           "final_loss": round(loss, 5)}
    for part in PARTS:
        values = times[part][2:] or times[part]
        out[part] = round(statistics.median(values), 5)
    return out


def run_llmhift(args, settings: dict) -> dict:
    import torch
    from composer import Callback, Trainer
    from torch.utils.data import DataLoader

    from llmhift.callbacks.hift import HiFTCallback

    baseline = _rss_mb()
    model, data = _model(args)
    times = {part: [] for part in PARTS}

    class Clock(Callback):
        """Event times of one step; listed before and after HiFT so that its batch start is between."""

        def __init__(self, first: bool) -> None:
            self.first, self.state_bytes = first, 0

        def batch_start(self, state, logger) -> None:
            if self.first:
                self.t = {"start": time.perf_counter()}
            else:
                clock.t["callback"] = time.perf_counter()

        def after_loss(self, state, logger) -> None:
            clock.t["loss"] = time.perf_counter()

        def before_backward(self, state, logger) -> None:
            clock.t["backward"] = time.perf_counter()

        def after_backward(self, state, logger) -> None:
            clock.t["backward_end"] = time.perf_counter()

        def batch_end(self, state, logger) -> None:
            if self.first:
                return
            t, end = clock.t, time.perf_counter()
            times["callback_s"].append(t["callback"] - t["start"])
            times["forward_s"].append(t["loss"] - t["callback"])
            times["backward_s"].append(t["backward_end"] - t["backward"])
            times["optimizer_s"].append(end - t["backward_end"])
            times["step_s"].append(end - t["start"])
            self.state_bytes = max(self.state_bytes, _state_bytes(state.optimizers[0].state.values()))
            self.loss = float(state.loss)

    clock, after = Clock(first=True), Clock(first=False)
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=args.batch_size),
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-4), max_duration=f"{args.steps}ba",
                      device="cpu", precision="fp32", callbacks=[clock, HiFTCallback(**settings), after],
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    return _summary(times, after.state_bytes, baseline, after.loss)


def run_badam(args) -> dict:
    import torch
    from badam import BlockOptimizer
    from torch.utils.data import DataLoader

    from llmhift.callbacks.hift.schedule import find_units

    baseline = _rss_mb()
    model, data = _model(args)
    blocks = [names for _, names in find_units(model)]  # the units llmhift cycles over, as BAdam's blocks
    optimizer = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), list(model.named_parameters()),
                               block_prefix_list=blocks, switch_block_every=args.switch_every,
                               switch_mode="descending", verbose=0)
    times, state_bytes = {part: [] for part in PARTS}, 0
    for batch in DataLoader(data, batch_size=args.batch_size):
        start = time.perf_counter()
        loss = model.loss(model(batch), batch)
        backward = time.perf_counter()
        loss.backward()
        step = time.perf_counter()
        held = _state_bytes(optimizer.base_optimizer.state.values(), optimizer.param_idx2hp.values())
        optimizer.step()  # switches blocks at its end: the state before the switch was measured above
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if (optimizer.global_step % args.switch_every) != 0:  # no switch in this step: its state is complete
            held = _state_bytes(optimizer.base_optimizer.state.values(), optimizer.param_idx2hp.values())
        state_bytes = max(state_bytes, held)
        for part, value in (("forward_s", backward - start), ("backward_s", step - backward),
                            ("optimizer_s", end - step), ("callback_s", 0.0), ("step_s", end - start)):
            times[part].append(value)
    return _summary(times, state_bytes, baseline, float(loss))


def run_arm(arm: str, args) -> dict:
    if arm == "badam":
        return run_badam(args)
    if arm == "llmhift_reset":
        return run_llmhift(args, dict(optimizer_state="reset", switch_every=args.switch_every, strategy="up2down"))
    return run_llmhift(args, dict(optimizer_state="keep", strategy="up2down"))


def ensure_peer(name: str, peers_dir: Path, offline: bool) -> str | None:
    """None when the peer is importable from ``peers_dir`` (installed there now unless offline), else
    the reason it is skipped."""
    install = f"{sys.executable} -m pip install --target {peers_dir} --no-deps {PEER_PACKAGES[name]}"
    if not (peers_dir / name).is_dir():
        if offline:
            return f"skipped: {name} is not in {peers_dir}; install it with: {install}"
        done = subprocess.run(install.split(), capture_output=True, text=True)
        if done.returncode != 0:
            return f"skipped: `{install}` failed: {done.stderr.strip().splitlines()[-1:]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--layers", 12), ("--d-model", 768), ("--batch-size", 2), ("--seq-len", 128),
                          ("--steps", 18), ("--switch-every", 3), ("--repeats", 3)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run: " + json.dumps(TINY))
    parser.add_argument("--offline", action="store_true", help="install nothing; skip a missing peer")
    parser.add_argument("--peers-dir", type=Path, default=DEFAULT_PEERS_DIR)
    parser.add_argument("--one", choices=ARMS, help=argparse.SUPPRESS)  # internal: one arm in this process
    args = parser.parse_args()
    if args.tiny:
        vars(args).update(TINY)
    if args.one:
        sys.path.insert(0, str(args.peers_dir))
        print(json.dumps(run_arm(args.one, args)))
        return
    skipped = {name: why for name in PEER_PACKAGES if (why := ensure_peer(name, args.peers_dir, args.offline))}
    for why in skipped.values():
        print(why, file=sys.stderr)
    arms = [arm for arm in ARMS if arm not in skipped]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    shape = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in TINY if k != "repeats"]
    for _ in range(args.repeats):
        for arm in arms:
            out = subprocess.run([sys.executable, __file__, "--one", arm, f"--peers-dir={args.peers_dir}", *shape],
                                 capture_output=True, text=True, check=True)
            runs[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    medians = {arm: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for arm, rs in runs.items()}
    ratios = {}
    if "badam" in medians:
        ours, peer = medians["llmhift_reset"], medians["badam"]
        ratios = {key: round(ours[key] / peer[key], 3) for key in ("peak_rss_mb", "peak_optimizer_state_mb", "step_s")}
    print(json.dumps({"shape": {k: getattr(args, k) for k in TINY}, "skipped": skipped, "median": medians,
                      "runs": runs, "ratio_llmhift_reset_vs_badam": ratios}, indent=2))


if __name__ == "__main__":
    main()
