"""Samples/s of DynamicStreamingDataset vs a plain streaming.StreamingDataset over the same shards, and
of the multi-task instruction loader vs the single-task one over the same conversations.

    python bench/dataloader.py [--data demo_runs/data] [--samples 20000] [--batch-size 16] [--workers 0 2]
                               [--cases dynamic instruction]

Builds the demo corpus into ``--data`` if missing. Each pair of loaders reads through a torch DataLoader
with the same batch size and workers, in the same process, alternately (``--repeats`` pairs), so machine
load hits both alike. Prints one JSON object; each ``ratio`` is dynamic / streaming or tasks / single
(goal >= 0.9). The dynamic case reports the best of the repeats; the instruction case the median rates
and the median of the pairs' ratios; at 0 workers it counts this process's CPU time, not wall time (both
loaders are CPU-bound in this process, and on a shared machine wall time swings with other jobs' load).
``single_with_domain_idx_ratio`` times the single-task rows with a ``domain_idx`` tensor added (no task
sampling) against the plain ones: the share of the gap that the batch's extra key costs by itself.
The instruction case writes the demo tasks into a temporary folder (never into
``--data``) and tokenizes the rows once per loader, outside the timing: it measures sampling, padding
and collation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from streaming import Stream, StreamingDataset  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from llmhift.datasets.demo_data import ensure_demo_data  # noqa: E402
from llmhift.datasets.demo_tasks import DEMO_TASKS, build_demo_tasks  # noqa: E402
from llmhift.datasets.dynamic_streaming import DynamicStreamingDataset  # noqa: E402
from llmhift.datasets.instruction import InstructionDataset  # noqa: E402
from llmhift.datasets.instruction_tasks import MultiTaskInstructionDataset, TaskMixDataset  # noqa: E402
from llmhift.datasets.text import find_domains  # noqa: E402


def samples_per_second(dataset, batch_size: int, workers: int, samples: int, sampler=None,
                       clock=time.perf_counter) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, prefetch_factor=2 if workers else None,
                        sampler=sampler)
    batches = samples // batch_size
    iterator = iter(loader)
    next(iterator)  # worker start-up and first shard open are not throughput
    start = clock()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (clock() - start)


def dynamic_case(data: Path, args: argparse.Namespace) -> list[dict]:
    mds = data / "mds"
    domains = find_domains(mds, "train")
    results = []
    for workers in args.workers:
        best = {"dynamic": 0.0, "streaming": 0.0}
        for _ in range(args.repeats):
            dynamic = DynamicStreamingDataset(str(mds), "train", domains, batch_size=args.batch_size)
            rate = samples_per_second(dynamic, args.batch_size, workers, args.samples)
            best["dynamic"] = max(best["dynamic"], rate)
            streams = [Stream(local=str(mds / "train" / d)) for d in domains]
            # Over 20000 samples it would end (the demo train split has ~12000): epoch_size makes it long enough.
            plain = StreamingDataset(streams=streams, batch_size=args.batch_size, shuffle=True,
                                     epoch_size=args.samples + 2 * args.batch_size)  # fmt: skip
            rate = samples_per_second(plain, args.batch_size, workers, args.samples)
            best["streaming"] = max(best["streaming"], rate)
            del plain  # frees its shared memory before the next one is made over the same folders
        results.append({"workers": workers, "dynamic_samples_per_s": round(best["dynamic"]),
                        "streaming_samples_per_s": round(best["streaming"]),
                        "ratio": round(best["dynamic"] / best["streaming"], 3)})  # fmt: skip
    return results


class WithTaskKey(Dataset):
    """The single-task rows plus a ``domain_idx`` tensor, as a multi-task batch carries: the cost of that
    key alone (its collation and its transfer from a worker), without any task sampling."""

    def __init__(self, rows: InstructionDataset) -> None:
        self.rows, self.ids = rows, [torch.tensor(t) for t in range(len(DEMO_TASKS))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        item = self.rows[i]
        item["domain_idx"] = self.ids[i % len(self.ids)]
        return item


def instruction_case(data: Path, args: argparse.Namespace) -> list[dict]:
    """The demo tasks through TaskMixDataset vs the same conversations in one file through
    InstructionDataset (sampled with replacement, as the task stream is endless)."""
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    with tempfile.TemporaryDirectory(prefix="bench-mft-") as tmp:
        tasks = build_demo_tasks(Path(tmp) / "tasks")
        single = Path(tmp) / "single"  # every task's train lines in one file: the single-task loader's input
        single.mkdir()
        (single / "train.jsonl").write_text("".join((tasks / t / "train.jsonl").read_text() for t in DEMO_TASKS))
        rows = MultiTaskInstructionDataset(tasks, "train", tokenizer, 128, "mftcoder", tasks=list(DEMO_TASKS))
        one = InstructionDataset(single, "train", tokenizer, 128, "mftcoder")
    results = []
    for workers in args.workers:
        rates: dict[str, list[float]] = {"tasks": [], "single": [], "keyed": []}
        clock = time.perf_counter if workers else time.process_time
        for _ in range(args.repeats):
            mix = TaskMixDataset(rows, batch_size=args.batch_size)
            rates["tasks"].append(samples_per_second(mix, args.batch_size, workers, args.samples, clock=clock))
            sampler = RandomSampler(one, replacement=True, num_samples=args.samples + 2 * args.batch_size)
            rates["single"].append(samples_per_second(one, args.batch_size, workers, args.samples, sampler, clock))
            keyed = WithTaskKey(one)
            sampler = RandomSampler(keyed, replacement=True, num_samples=args.samples + 2 * args.batch_size)
            rates["keyed"].append(samples_per_second(keyed, args.batch_size, workers, args.samples, sampler, clock))
        ratios = [t / s for t, s in zip(rates["tasks"], rates["single"])]
        results.append({"workers": workers, "clock": "wall" if workers else "cpu",
                        "tasks_samples_per_s": round(statistics.median(rates["tasks"])),
                        "single_samples_per_s": round(statistics.median(rates["single"])),
                        "ratio": round(statistics.median(ratios), 3),
                        "ratios": [round(r, 3) for r in ratios],
                        "single_with_domain_idx_ratio": round(statistics.median(
                            k / s for k, s in zip(rates["keyed"], rates["single"])), 3)})  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo_runs/data")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=["dynamic", "instruction"], default=["dynamic", "instruction"])
    args = parser.parse_args()
    data = Path(ensure_demo_data(args.data))
    cases = {"dynamic": dynamic_case, "instruction": instruction_case}
    print(json.dumps({"batch_size": args.batch_size, "samples": args.samples,
                      **{case: cases[case](data, args) for case in args.cases}, "goal": "ratio >= 0.9"}))  # fmt: skip


if __name__ == "__main__":
    main()
