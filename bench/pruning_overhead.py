"""Training-step time of a ComposerLlama under L0 masks (every pruning module on) vs without masks.

    python bench/pruning_overhead.py                        # CPU, fp32, a small LLaMA (GQA)
    python bench/pruning_overhead.py --device cuda --dtype bf16 --d-model 2048 --layers 8 --seq-len 2048

Both models share one config and the same weights; each repetition times forward + loss + Lagrangian
+ backward + AdamW step of the same batch for both (alternating which goes first), and the JSON
reports the median step time of each and their ratio (goal: <= 1.15 on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from timing import wall_seconds  # bench/timing.py: scripts here run with bench/ on sys.path

from llmhift.models.l0_module import PRUNING_MODULES, L0Module
from llmhift.models.llama import ComposerLlama, LlamaConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args: argparse.Namespace) -> tuple[ComposerLlama, ComposerLlama]:
    config = LlamaConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                         n_kv_heads=args.kv_heads, intermediate_size=args.intermediate, max_seq_len=args.seq_len)
    target = dict(d_model=args.d_model // 2, n_kv_heads=max(1, args.kv_heads // 2), n_layers=args.layers - 1,
                  intermediate_size=args.intermediate // 2)
    torch.manual_seed(0)
    plain = ComposerLlama(config)
    masked = ComposerLlama(config, mask_source=L0Module(config, target, PRUNING_MODULES))
    masked.model.load_state_dict(plain.model.state_dict())
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    return plain.to(device, dtype).train(), masked.to(device).train()


def make_step(model: ComposerLlama, batch: dict[str, torch.Tensor], autocast: torch.dtype | None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast(batch["input_ids"].device.type, dtype=autocast, enabled=autocast is not None):
            loss = model.loss(model(batch), batch)
            if model.mask_source is not None:
                loss = loss + model.mask_source.lagrangian()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    plain, masked = build(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    batch = {"input_ids": ids}
    # bf16 runs the masked model under autocast (the L0 parameters stay fp32, as with amp_bf16).
    autocast = None if args.dtype == "fp32" else DTYPES[args.dtype]
    steps = {"plain": make_step(plain, batch, None), "masked": make_step(masked, batch, autocast)}
    for run in steps.values():
        run()  # warm-up: allocator, kernels, optimizer state
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.repeats):
        for name in (("plain", "masked") if i % 2 == 0 else ("masked", "plain")):
            times[name].append(wall_seconds(steps[name], device))
    plain_s, masked_s = statistics.median(times["plain"]), statistics.median(times["masked"])
    print(json.dumps({
        "device": str(device), "dtype": args.dtype, "d_model": args.d_model, "layers": args.layers,
        "heads": args.heads, "kv_heads": args.kv_heads, "seq_len": args.seq_len, "batch": args.batch,
        "pruning_modules": list(PRUNING_MODULES),
        "plain_step_s": round(plain_s, 4), "masked_step_s": round(masked_s, 4),
        "masked_over_plain": round(masked_s / plain_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
