"""The multi-task demo (yamls/demo/mft.yaml, with HiFT on) through train.py's build: the dynamic task mix
moves towards the lagging task, a crashed run resumes the same batches, proportions, losses and self-paced
weights, and bad task settings fail before anything is built."""

from __future__ import annotations

import hashlib

import pytest
from composer import Callback
from composer.utils import reproducibility

import train
from llmhift.build.config import load_config
from llmhift.build.trainer import build_trainer
from llmhift.callbacks.dynamic_loading import PROPORTION_KEY, DynamicLoadingCallback
from llmhift.callbacks.hift.callback import ACTIVE_GROUP_KEY as HIFT_GROUP
from llmhift.callbacks.task_balance import TASK_WEIGHT_KEY, TRAIN_TASK_LOSS_KEY, TaskBalanceCallback
from llmhift.datasets.demo_tasks import DEMO_TASKS
from llmhift.report import plot_run, read_metrics
from tests.helpers import CrashAt

YAML = "yamls/demo/mft.yaml"
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.intermediate_size=64",
        "device_eval_batch_size=64", "progress_bar=false", "log_to_console=false"]  # fmt: skip
RUN = ["max_duration=6ba", "eval_interval=2ba", "save_interval=2ba", "global_train_batch_size=8",
       "device_train_microbatch_size=4", "train_loader.num_workers=1", "train_loader.persistent_workers=true",
       "train_loader.dataset.lookahead_batches=3", "run_name=mft", "autoresume=true",
       "model.loss_balance=self_paced", "callbacks.hift={group_element: 1}"]  # fmt: skip


class Record(Callback):
    """Per train batch: a hash of its token ids, its tasks, the train loss and the schedule after it."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple[str, list[int]]] = {}
        self.losses: dict[int, float] = {}
        self.schedules: dict[int, list] = {}

    def after_dataloader(self, state, logger) -> None:
        key = int(state.timestamp.batch) + 1
        ids = state.batch["input_ids"]
        self.batches[key] = (hashlib.sha1(ids.numpy().tobytes()).hexdigest(), state.batch["domain_idx"].tolist())

    def batch_end(self, state, logger) -> None:
        self.losses[int(state.timestamp.batch)] = float(state.loss)
        self.schedules[int(state.timestamp.batch)] = state.train_dataloader.dataset.schedule()


def run(demo_root, tasks, folder, *callbacks):
    reproducibility.seed_all(17)  # build_trainer creates the model before the Trainer seeds anything
    config = load_config(YAML, [f"variables.data_root={demo_root}", f"variables.tasks={tasks}",
                                f"save_folder={folder}", *TINY, *RUN])  # fmt: skip
    trainer = build_trainer(config)
    trainer.state.callbacks.extend(callbacks)
    start = int(trainer.state.timestamp.batch)
    trainer.fit()
    return trainer, start


def callback(trainer, kind):
    return next(c for c in trainer.state.callbacks if isinstance(c, kind))


@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mft") / "tasks"  # the yaml's demo_data builds it on first use


@pytest.fixture(scope="module")
def full_run(demo_root, tasks_root, tmp_path_factory):
    record = Record()
    folder = tmp_path_factory.mktemp("full")
    trainer, _ = run(demo_root, tasks_root, folder, record)
    trainer.close()  # flushes the jsonl logger the report reads
    history = callback(trainer, DynamicLoadingCallback).history
    return record, history, callback(trainer, TaskBalanceCallback).weights, folder


@pytest.mark.slow
def test_demo_task_mix_moves_towards_the_lagging_task(full_run):
    record, history, weights, _ = full_run
    assert [h["first_sample"] for h in history] == [8 * (b + 3) for b in (2, 4, 6)]
    for before, after in zip([[0.34, 0.33, 0.33]] + [h["proportion"] for h in history], [h for h in history]):
        excess = [loss - target for loss, target in zip(after["losses"], [2.0, 0.5, 2.0])]
        lagging = excess.index(max(excess))
        assert after["proportion"][lagging] > before[lagging], (DEMO_TASKS[lagging], before, after)
    # the first change (at sample 40, batch 6) is in force in the last batch, and moves its tasks
    assert record.schedules[6][1] == (40, history[0]["proportion"])
    assert weights is not None and len(weights) == 3 and abs(sum(weights) - 1) < 1e-9  # self_paced moved


@pytest.mark.slow
def test_crashed_run_resumes_the_same_batches_mix_losses_and_task_weights(full_run, demo_root, tasks_root, tmp_path):
    record, history, weights, _ = full_run
    first = Record()
    with pytest.raises(KeyboardInterrupt):
        run(demo_root, tasks_root, tmp_path, first, CrashAt(4))
    resumed = Record()
    trainer, start = run(demo_root, tasks_root, tmp_path, resumed)
    assert start == 4
    assert {b: first.batches[b] for b in range(1, 5)} == {b: record.batches[b] for b in range(1, 5)}
    assert resumed.batches == {b: record.batches[b] for b in range(5, 7)}
    assert resumed.schedules == {b: record.schedules[b] for b in range(5, 7)}
    assert resumed.losses == {b: record.losses[b] for b in range(5, 7)}  # bit-exact: same weights, same data
    assert callback(trainer, DynamicLoadingCallback).history == history
    assert callback(trainer, TaskBalanceCallback).weights == weights


@pytest.mark.slow
def test_report_plots_per_task_losses_and_the_task_mix(full_run, tmp_path):
    *_, folder = full_run
    series = read_metrics(folder / "metrics.jsonl")
    for task in DEMO_TASKS:  # logged every batch where the task had tokens, and at each evaluation
        assert len(series[TRAIN_TASK_LOSS_KEY.format(task)]) >= 3 and len(series[TASK_WEIGHT_KEY.format(task)]) == 3
        assert len(series[PROPORTION_KEY.format(task)]) == 4  # the start and 3 updates
    # HiFT on, one group per step (logged at batch start), down2up over 4 groups: the embedding,
    # block 0, block 1, then the final norm with the tied head
    assert series[HIFT_GROUP] == {b: b % 4 for b in range(6)}
    pngs = sorted(p.name for p in plot_run("mft", series, tmp_path))
    assert pngs == ["mft_hift.png", "mft_loss.png", "mft_proportions.png", "mft_tasks.png"], pngs  # no throughput: 6 batches


@pytest.mark.parametrize("override, message", [
    ("train_loader.dataset.tasks=[docstring_qa,nowhere]", "train_loader.dataset.tasks: "),
    ("model.loss_balance=median", "model.loss_balance: 'median' is not one of"),
    ("max_duration=1ep", "max_duration: the dynamic (or multi-task) train loader has no epochs"),
    ("train_loader.dataset.packing=sometimes", "train_loader.dataset.packing: 'sometimes' is not true, false or"),
])
def test_bad_task_settings_fail_early_naming_the_key(override, message, demo_root, tasks_root, tmp_path, capsys):
    code = train.main([YAML, f"variables.data_root={demo_root}", f"variables.tasks={tasks_root}",
                       f"save_folder={tmp_path / 'run'}", *TINY, override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "run").exists()
