"""Training throughput of ComposerLlama vs transformers' LlamaForCausalLM, measured side by side.

    python bench/model_throughput.py                       # CPU, fp32, a small LLaMA
    python bench/model_throughput.py --device cuda --dtype bf16 --d-model 2048 --layers 8 --seq-len 2048

Both models share one config and the same weights; each repetition times forward + loss + backward
of the same batch for ours then HF (alternating which goes first), and the JSON reports the median
tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import transformers
from timing import wall_seconds  # bench/timing.py: scripts here run with bench/ on sys.path

from llmhift.models.hf_adapter import hf_to_llmhift_state_dict, llama_config_from_hf
from llmhift.models.llama import ComposerLlama

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_pair(args: argparse.Namespace) -> tuple[ComposerLlama, transformers.LlamaForCausalLM]:
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config)
    config = llama_config_from_hf(hf_config.to_dict())
    ours = ComposerLlama(config)
    ours.load_state_dict(hf_to_llmhift_state_dict(hf.state_dict(), config.tie_word_embeddings))
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    return ours.to(device, dtype).train(), hf.to(device, dtype).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    device = torch.device(args.device)
    ours, hf = build_pair(args)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": input_ids.to(device), "labels": input_ids.to(device)}

    def ours_step() -> None:
        ours.zero_grad(set_to_none=True)
        ours.loss(ours(batch), batch).backward()

    def hf_step() -> None:
        hf.zero_grad(set_to_none=True)
        hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()

    for _ in range(args.warmup):
        ours_step()
        hf_step()
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for rep in range(args.reps):
        order = [("ours", ours_step), ("hf", hf_step)]
        for name, run in order if rep % 2 == 0 else reversed(order):
            times[name].append(wall_seconds(run, device))

    tokens = args.batch * args.seq_len
    ours_tps = tokens / statistics.median(times["ours"])
    hf_tps = tokens / statistics.median(times["hf"])
    report = {
        "bench": "model_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": {k: getattr(args, k) for k in ("vocab", "d_model", "intermediate", "layers", "heads", "kv_heads")},
        "batch": args.batch,
        "seq_len": args.seq_len,
        "reps": args.reps,
        "ours_tokens_per_s": round(ours_tps, 1),
        "hf_tokens_per_s": round(hf_tps, 1),
        "ratio_ours_over_hf": round(ours_tps / hf_tps, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
