"""Host memory and time of loading a pretrained LLaMA under FSDP2 on 2 gloo ranks, rank-0 loading vs
every rank reading the checkpoint (the naive way), side by side in one run; prints JSON.

    python bench/rank0_loading.py                  # LLaMA-2-7B shape, ~13.5 GB bf16 checkpoint
    python bench/rank0_loading.py --layers 8       # 7B width, fewer blocks (when RAM is short)
    python bench/rank0_loading.py --tiny           # CI

The bench writes a bf16 safetensors checkpoint of random weights in a Hugging Face folder (one shard
per decoder block, each written and dropped before the next, so it never holds the weights twice),
then launches 2 ranks once per arm (each arm in fresh processes, one arm after the other, so neither
inherits the other's heap):

- ``rank0``: ``llmhift.build.trainer.build_model`` with ``fsdp_config``: rank 0 reads the checkpoint,
  rank 1 builds on the meta device, and Composer's FSDP2 wrapping (``parallelism_config``) broadcasts
  rank 0's weights into both ranks' shards;
- ``naive``: the same model built without ``fsdp_config``, so every rank reads the whole checkpoint,
  then wrapped the same way.

Per rank and arm, RSS above the RSS right before building the model (sampled every 2 ms by a thread):
the peak while loading (building, wrapping, broadcasting: until the Trainer exists), what is still held
then, and the peak through the first forward; and the time from building the model to the end of the
first forward. The load and the forward are measured apart because FSDP2's forward gathers every block
in turn and keeps the root unit (embedding, head) gathered afterwards: that is working memory of
training, on the GPU in a GPU run, not loading. On these CPU ranks a rank's fp32 shard (``shard_mb``,
half the model) lives in host memory, where a GPU run puts it on the GPU; ``load_peak_mb`` minus
``held_after_load_mb`` is the transient the loading adds on top. The write-up's 7B figures (rank 0
32,744 MB, rank 1 1,506 MB, host memory with the shards on the GPUs) are printed beside them.
ComposerLlama keeps fp32 weights, so the loaded model takes 4 bytes per parameter (the write-up's
figure is fp32 too). The checkpoint is deleted at the end. The arms are skipped, with a message, when
this machine's free disk or RAM is short.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

MB = 10**6
WRITEUP_MB = {"rank0": 32744, "rank1": 1506}  # PyTorch FSDP Llama-2 write-up, 7B, peak host memory per rank
SHAPE_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32)
SHAPE_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
WORLD = 2
ARMS = ("rank0", "naive")


def write_checkpoint(folder: Path, shape: dict) -> int:
    """A bf16 HF LLaMA folder of random weights, one safetensors shard per block; returns its parameter count."""
    import transformers

    transformers.LlamaConfig(**shape, torch_dtype="bfloat16").save_pretrained(folder)
    d, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": (vocab, d)},
              "model-head.safetensors": {"model.norm.weight": (d,), "lm_head.weight": (vocab, d)}}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shards[f"model-{i:03d}.safetensors"] = {
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter), p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,)}
    weight_map, count = {}, 0
    generator = torch.Generator().manual_seed(0)
    for file, tensors in shards.items():
        shard = {name: torch.randn(size, generator=generator, dtype=torch.bfloat16) * 0.02 for name, size in tensors.items()}
        save_file(shard, folder / file)
        count += sum(t.numel() for t in shard.values())
        weight_map.update(dict.fromkeys(shard, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return count


class PeakRSS:
    """The largest resident set size seen by a sampling thread while the block runs."""

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(folder: str, out: str, arm: str) -> None:
    """One rank of one arm, measured from its own pre-load RSS."""
    from composer import Trainer
    from composer.utils import dist

    from llmhift.build.config import config_from_dict
    from llmhift.build.parallel import parallelism_config
    from llmhift.build.trainer import build_model

    dist.initialize_dist("cpu")
    rank = dist.get_global_rank()
    base = {"model": {"name": "llama", "pretrained": folder}, "max_duration": "1ba", "global_train_batch_size": 2,
            "train_loader": {"dataset": {"local": "unused", "max_seq_len": 16}}}
    fsdp = {"fsdp_config": {"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"}}
    sharded = config_from_dict({**base, **fsdp})
    dist.barrier()
    with PeakRSS() as load:
        start = time.perf_counter()
        model = build_model(sharded if arm == "rank0" else config_from_dict(base))
        trainer = Trainer(model=model, parallelism_config=parallelism_config(sharded), device="cpu",
                          progress_bar=False, log_to_console=False)
    held = _rss()
    with PeakRSS() as forward:
        ids = torch.arange(16).reshape(2, 8) % model.config.vocab_size
        with torch.no_grad():
            model({"input_ids": ids})
        seconds = time.perf_counter() - start
    results = {"load_peak_mb": round((load.peak - load.baseline) / MB),
               "held_after_load_mb": round((held - load.baseline) / MB),
               "forward_peak_mb": round((max(load.peak, forward.peak) - load.baseline) / MB),
               "baseline_mb": round(load.baseline / MB), "first_forward_s": round(seconds, 2)}
    print(f"rank {rank}: {arm} arm {results}", file=sys.stderr, flush=True)
    trainer.close()
    Path(out, f"{arm}-rank{rank}.json").write_text(json.dumps(results))


def _launch(folder: Path, out: Path, arm: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(folder), str(out), arm], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"error: a rank failed (exit codes {codes}); see its output above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CI)")
    parser.add_argument("--layers", type=int, help="decoder blocks (default: the shape's)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write the checkpoint")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    shape = dict(SHAPE_TINY if args.tiny else SHAPE_7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    params = 2 * shape["vocab_size"] * d + layers * (4 * d * d + 3 * d * shape["intermediate_size"])
    disk, ram = shutil.disk_usage(args.dir).free, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # every rank holding the fp32 model, and as much again while FSDP shards it (a --layers 8 run with
    # ~1.5x that much available was killed for memory)
    naive_ram = WORLD * 4 * params * 2
    if disk < 2 * params * 1.1 or ram < naive_ram:
        print(f"skipped: {params / 1e9:.2f}B parameters need {2 * params / 1e9:.1f} GB of disk in {args.dir} "
              f"(free {disk / 1e9:.1f}) and ~{naive_ram / 1e9:.1f} GB of RAM for the naive arm "
              f"(available {ram / 1e9:.1f}); try --layers N", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="rank0_loading-") as tmp:
        folder, out = Path(tmp, "hf"), Path(tmp, "out")
        folder.mkdir()
        out.mkdir()
        start = time.perf_counter()
        written = write_checkpoint(folder, shape)
        write_s = time.perf_counter() - start
        for arm in ARMS:
            _launch(folder, out, arm)
        ranks = {f"rank{r}": {arm: json.loads(Path(out, f"{arm}-rank{r}.json").read_text()) for arm in ARMS}
                 for r in range(WORLD)}
    naive_peak = max(r["naive"]["load_peak_mb"] for r in ranks.values())
    rank1 = ranks["rank1"]["rank0"]
    print(json.dumps({
        "bench": "rank0_loading", "shape": shape, "params": written, "checkpoint_gb": round(2 * written / 1e9, 2),
        "write_s": round(write_s, 1), "ranks": ranks,
        "writeup_7b_peak_mb": WRITEUP_MB, "model_fp32_mb": round(4 * written / MB),
        "shard_mb": round(4 * written / WORLD / MB),
        "rank1_load_transient_mb": rank1["load_peak_mb"] - rank1["held_after_load_mb"],
        "rank1_rank0_arm_over_naive": round(rank1["load_peak_mb"] / naive_peak, 3),
        "rank0_rank0_arm_over_naive": round(ranks["rank0"]["rank0"]["load_peak_mb"] / naive_peak, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
