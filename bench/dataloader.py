"""Samples/s of DynamicStreamingDataset vs a plain streaming.StreamingDataset over the same shards.

    python bench/dataloader.py [--data demo_runs/data] [--samples 20000] [--batch-size 16] [--workers 0 2]

Builds the demo corpus into ``--data`` if missing. Both loaders read every domain of the train split
through a torch DataLoader with the same batch size and workers, in the same process, alternately
(best of ``--repeats``), so machine load hits both alike. Prints one JSON object; ``ratio`` is
dynamic / streaming (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming import Stream, StreamingDataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from llmhift.datasets.demo_data import ensure_demo_data  # noqa: E402
from llmhift.datasets.dynamic_streaming import DynamicStreamingDataset  # noqa: E402
from llmhift.datasets.text import find_domains  # noqa: E402


def samples_per_second(dataset, batch_size: int, workers: int, samples: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, prefetch_factor=2 if workers else None)
    batches = samples // batch_size
    iterator = iter(loader)
    next(iterator)  # worker start-up and first shard open are not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo_runs/data")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mds = Path(ensure_demo_data(args.data)) / "mds"
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
    print(json.dumps({"batch_size": args.batch_size, "samples": args.samples, "results": results,
                      "goal": "ratio >= 0.9"}))  # fmt: skip


if __name__ == "__main__":
    main()
