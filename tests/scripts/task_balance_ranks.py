"""One rank of the multi-task equivalence checks: a tiny ComposerLlama with tasks trains one batch of a
fixed global batch (this rank's share, in micro-batches) and evaluates a fixed eval set (this rank's
share, uneven); writes ``OUT/rank{R}.pt`` with the gradients the optimizer would step on and the
per-task eval losses. Run alone (one process), under ``composer -n 2``, or with ``--fork W`` (W ranks
forked from this process, which sets up nothing distributed itself: the ranks share its imports of
torch and Composer instead of each paying ~10 s of CPU for them, the bulk of a 2-rank test's time)::

    python tests/scripts/task_balance_ranks.py OUT MICROBATCH [LOSS_BALANCE] [--fork W]

``global_batch()`` and ``eval_set()`` are the data; the test computes its reference from them in one
process. A plain script (not a test module): pytest never collects it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from composer import Callback, Evaluator, Trainer  # noqa: E402
from composer.utils import dist  # noqa: E402

from llmhift.callbacks import TaskBalanceCallback  # noqa: E402
from llmhift.models.causal_lm import IGNORE_INDEX  # noqa: E402
from llmhift.models.llama import ComposerLlama, LlamaConfig  # noqa: E402
from tests.helpers import free_port  # noqa: E402

TASKS = ["qa", "math", "code"]
VOCAB, SEQ = 64, 12
CONFIG = LlamaConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=64,
                     max_seq_len=SEQ)


def _rows(seed: int, tasks: list[int]) -> list[dict[str, torch.Tensor]]:
    """Rows with a prompt of random length (ignored) and a response; tasks of very different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for task in tasks:
        ids = torch.randint(VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, SEQ - 2, (1,), generator=g))] = IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels, "domain_idx": torch.tensor(task)})
    return rows


def global_batch() -> list[dict[str, torch.Tensor]]:
    """8 rows; rank r of 2 takes rows r, r + 2, ...: rank 1 holds no ``code`` row."""
    return _rows(0, [0, 1, 2, 1, 0, 1, 0, 1])


def eval_set() -> list[dict[str, torch.Tensor]]:
    """5 rows (3 on rank 0, 2 on rank 1 plus the sampler's padding, which Composer's eval leaves out);
    no ``code`` row at all."""
    return _rows(1, [0, 1, 1, 0, 1])


def model(loss_balance: str = "task") -> ComposerLlama:
    torch.manual_seed(0)
    return ComposerLlama(CONFIG, tasks=TASKS, eval_domains=TASKS, loss_balance=loss_balance)


class Gradients(Callback):
    """The gradients after the last micro-batch (inside the optimizer's closure, before its step)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def after_train_batch(self, state, logger) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None}


def run(out: Path, microbatch: int, loss_balance: str = "task") -> None:
    """Trains one batch and evaluates; writes ``out/rank{R}.pt``."""
    dist.initialize_dist("cpu")
    rank = dist.get_global_rank()
    train, evals = global_batch(), eval_set()  # a DistributedSampler without shuffling: rank r reads r, r + W, ...
    loader = torch.utils.data.DataLoader(train, batch_size=len(train) // dist.get_world_size(),
                                         sampler=dist.get_sampler(train, shuffle=False))
    eval_loader = torch.utils.data.DataLoader(evals, batch_size=2, sampler=dist.get_sampler(evals, shuffle=False))
    grads = Gradients()
    built = model(loss_balance)
    trainer = Trainer(model=built, train_dataloader=loader, max_duration="1ba",
                      eval_dataloader=Evaluator(label="eval", dataloader=eval_loader), eval_interval="1ba",
                      optimizers=torch.optim.SGD(built.parameters(), lr=0.0),
                      callbacks=[TaskBalanceCallback(), grads], device="cpu", precision="fp32",
                      device_train_microbatch_size=microbatch, progress_bar=False, log_to_console=False, seed=17)
    trainer.fit()
    metrics = trainer.state.eval_metrics["eval"]
    values = {name: float(metric.compute()) for name, metric in sorted(metrics.items())}  # collectives
    names = {n.removeprefix("module."): g for n, g in grads.grads.items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"grads": names, "eval": values, "world": dist.get_world_size()}, out / f"rank{rank}.pt")


def _rank(env: dict[str, str], out: Path, microbatch: int, loss_balance: str) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)  # W ranks on the machine's cores: one thread each
    run(out, microbatch, loss_balance)


def fork_ranks(out: Path, microbatch: int, loss_balance: str, world_size: int, timeout: float = 200) -> int:
    """Runs ``world_size`` ranks as forks of this process, with the variables a launcher would set;
    returns the worst exit code. A rank that fails or hangs has the others killed: none waits on a
    collective that never comes."""
    common = {"WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "NODE_RANK": "0",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_rank, args=({**common, "RANK": str(r), "LOCAL_RANK": str(r)}, out, microbatch,
                                                 loss_balance)) for r in range(world_size)]  # fmt: skip
    for rank in ranks:
        rank.start()
    deadline = time.monotonic() + timeout
    while any(rank.is_alive() for rank in ranks):
        if time.monotonic() > deadline or any(rank.exitcode not in (None, 0) for rank in ranks):
            for rank in ranks:
                rank.kill()
            break
        time.sleep(0.1)
    for rank in ranks:
        rank.join()
    return max(abs(rank.exitcode) for rank in ranks)


if __name__ == "__main__":
    args = sys.argv[1:]
    world = int(args.pop(args.index("--fork") + 1)) if "--fork" in args else 0
    args = [a for a in args if a != "--fork"]
    out, microbatch, balance = Path(args[0]), int(args[1]), args[2] if len(args) > 2 else "task"
    if world:
        sys.exit(fork_ranks(out, microbatch, balance, world))
    run(out, microbatch, balance)
