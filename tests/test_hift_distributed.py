"""HiFT on 2 CPU ranks (``composer -n 2``, DDP over gloo): the demo HiFT yaml runs to completion and
both ranks end with identical parameters, every one of which was trained.

This file is also the script each rank runs: ``composer -n 2 tests/test_hift_distributed.py OUT ...``
runs ``train.main`` on ``yamls/demo/hift.yaml`` and writes ``OUT/rank{R}.json`` with a hash of every
parameter and whether it moved from its initial value.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
YAML = "yamls/demo/hift.yaml"
BATCHES = 6  # the demo model has 6 units (tied embedding, 4 blocks, norm): one full cycle


@pytest.mark.slow
def test_two_ranks_finish_with_identical_parameters(demo_root, tmp_path):
    from tests.helpers import launch_ranks, rank_logs  # here: this file also runs as a rank's script

    out = tmp_path / "out"
    args = [str(out), f"variables.data_root={demo_root}", f"variables.instructions={tmp_path / 'instr'}",
            f"save_folder={tmp_path / 'ckpt'}", f"max_duration={BATCHES}ba", f"eval_interval={BATCHES}ba",
            "global_train_batch_size=8", "device_train_microbatch_size=2", "progress_bar=false",
            "log_to_console=false", "eval_subset_num_batches=1"]
    process = launch_ranks(__file__, args, tmp_path / "logs", timeout=300)
    assert process.returncode == 0, process.stdout[-4000:] + rank_logs(tmp_path / "logs")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["exit_code"] == ranks[1]["exit_code"] == 0
    assert ranks[0]["ddp_find_unused"] is True  # HiFT's companion Algorithm asked Composer's DDP for it
    assert ranks[0]["params"] == ranks[1]["params"]  # bit-identical on both ranks
    assert all(ranks[0]["moved"].values()), [n for n, m in ranks[0]["moved"].items() if not m]
    assert (tmp_path / "ckpt" / "latest-rank0.pt").exists()


def _rank_main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    from composer.utils import dist

    import train

    out, overrides = Path(argv[0]), argv[1:]
    built = {}
    build_trainer = train.build_trainer

    def build_and_keep(config, **kwargs):
        trainer = build_trainer(config, **kwargs)
        built["trainer"] = trainer
        built["initial"] = {n: p.detach().clone() for n, p in trainer.state.model.named_parameters()}
        return trainer

    train.build_trainer = build_and_keep
    exit_code = train.main([YAML, *overrides])
    params = dict(built["trainer"].state.model.named_parameters())
    record = {
        "exit_code": exit_code,
        "ddp_find_unused": getattr(built["trainer"].state.model, "find_unused_parameters", None),
        "params": {n: hashlib.sha1(p.detach().numpy().tobytes()).hexdigest() for n, p in params.items()},
        "moved": {n: not torch.equal(p, built["initial"][n]) for n, p in params.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_global_rank()}.json").write_text(json.dumps(record))
    return exit_code


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
