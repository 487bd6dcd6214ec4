"""DynamicLoadingCallback: the update rule by hand, validation, and real Composer runs of the demo yaml
(the under-trained domain gains weight; a crashed run resumes the same batches and proportions; two
gloo ranks read disjoint samples)."""

from __future__ import annotations

import hashlib
import json

import pytest
from composer import Callback
from composer.utils import reproducibility

import train
from llmhift.build.config import load_config
from llmhift.build.trainer import build_trainer
from llmhift.callbacks.dynamic_loading import DynamicLoadingCallback, doremi_update
from llmhift.datasets.dynamic_streaming import DynamicStreamingDataset
from tests.helpers import CrashAt, rank_logs

YAML = "yamls/demo/pretrain.yaml"
DEMO_DOMAINS = ["code", "data", "docs", "reference"]  # the data's order, which the yaml uses too
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.intermediate_size=64",
        "device_eval_batch_size=128", "progress_bar=false", "log_to_console=false"]  # fmt: skip


def test_doremi_update_by_hand():
    w, losses, target = [0.5, 0.25, 0.25], [2.0, 3.0, 1.0], [2.5, 2.0, 1.0]
    # clamped excess (0, 1, 0): alpha = (0.5, 0.25e, 0.25) / (0.75 + 0.25e)
    assert doremi_update(w, losses, target, eta=1.0, smoothing=0.0) == pytest.approx(
        [0.3497554090542189, 0.4753668864186717, 0.17487770452710946], abs=1e-15)
    # smoothing 0.1: 0.9 * alpha + 0.1 / 3
    assert doremi_update(w, losses, target, eta=1.0, smoothing=0.1) == pytest.approx(
        [0.3481132014821304, 0.4611635311101379, 0.19072326740773185], abs=1e-15)
    # unclamped excess (-0.5, 1, 0): (0.5 e^-0.5, 0.25e, 0.25) / sum: the first domain is pushed down
    assert doremi_update(w, losses, target, eta=1.0, smoothing=0.0, clamp=False) == pytest.approx(
        [0.2459900443037928, 0.5512254464841422, 0.20278450921206503], abs=1e-15)
    # eta scales the excess: eta 2 on excess 1 is excess 2 at eta 1
    assert doremi_update(w, losses, target, eta=2.0, smoothing=0.0) == pytest.approx(
        doremi_update(w, [2.0, 4.0, 1.0], target, eta=1.0, smoothing=0.0), abs=1e-15)
    # all below target: the weights stay; a zero weight stays at the smoothing floor c / k
    assert doremi_update(w, [1.0, 1.0, 1.0], target, smoothing=0.0) == pytest.approx(w, abs=1e-15)
    assert doremi_update([1.0, 0.0], [9.0, 9.0], [1.0, 1.0], smoothing=1e-4)[1] == pytest.approx(0.5e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(proportion=[0.5, 0.6]), "sum to 1"),
    (dict(proportion=[1.5, -0.5]), "non-negative"),
    (dict(proportion=[1.0]), "1 values for 2 domains"),
    (dict(target_loss=[1.0]), "target_loss"),
    (dict(update_type="exp3"), "update_type"),
    (dict(set_names=["a", "a"]), "unique"),
])  # fmt: skip
def test_callback_refuses_bad_settings(kwargs, match):
    settings = dict(set_names=["a", "b"], proportion=[0.5, 0.5], target_loss=[1.0, 2.0]) | kwargs
    with pytest.raises(ValueError, match=match):
        DynamicLoadingCallback(**settings)


BAD = [
    (["callbacks.data_loading.set_names=[code,docs,reference,wiki]"], "wiki"),
    (["train_loader.name=text"], "train_loader.name: dynamic"),
    (["max_duration=1ep"], "max_duration"),
    (["train_loader.num_workers=2"], "train_loader.dataset.lookahead_batches"),
    (["train_loader.dataset.proportion=[0.5,0.5]"], "train_loader.dataset.proportion"),
    (["eval_loader.name=dynamic"], "eval_loader.name"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[b[1] for b in BAD])
def test_bad_dynamic_config_fails_early_naming_the_key(overrides, key, demo_root, tmp_path, capsys):
    assert train.main([YAML, f"variables.data_root={demo_root}", f"save_folder={tmp_path}/ckpt", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err, err


def test_callback_on_a_static_loader_names_the_fix(demo_root, tmp_path):
    config = load_config(YAML, [f"variables.data_root={demo_root}", f"save_folder={tmp_path}", *TINY,
                                "max_duration=1ba"])  # fmt: skip
    config.train_loader.name, config.callbacks = "text", {}  # what the yaml check would refuse
    trainer = build_trainer(config)
    trainer.state.callbacks.append(DynamicLoadingCallback(DEMO_DOMAINS, [0.25] * 4, [1.0] * 4))
    with pytest.raises(TypeError, match="train_loader.name: dynamic"):
        trainer.fit()


class Record(Callback):
    """Per train batch: a hash of its token ids, its domains, and the proportions then scheduled."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple[str, list[int]]] = {}
        self.schedules: dict[int, list] = {}

    def after_dataloader(self, state, logger) -> None:
        ids = state.batch["input_ids"]
        key = int(state.timestamp.batch) + 1
        self.batches[key] = (hashlib.sha1(ids.numpy().tobytes()).hexdigest(), state.batch["domain_idx"].tolist())

    def batch_end(self, state, logger) -> None:
        self.schedules[int(state.timestamp.batch)] = state.train_dataloader.dataset.schedule()



RUN = ["max_duration=10ba", "eval_interval=2ba", "save_interval=2ba", "global_train_batch_size=4",
       "device_train_microbatch_size=4", "train_loader.num_workers=2", "train_loader.persistent_workers=true",
       "train_loader.dataset.lookahead_batches=5", "run_name=dyn", "autoresume=true"]  # fmt: skip


def run(demo_root, folder, *callbacks):
    # build_trainer creates the model before the Trainer seeds anything: seed here so that runs made
    # one after another in this process start from the same weights.
    reproducibility.seed_all(17)
    trainer = build_trainer(load_config(YAML, [f"variables.data_root={demo_root}", f"save_folder={folder}",
                                               *TINY, *RUN]))  # fmt: skip
    trainer.state.callbacks.extend(callbacks)
    start = int(trainer.state.timestamp.batch)
    trainer.fit()
    return trainer, start


@pytest.fixture(scope="module")
def full_run(demo_root, tmp_path_factory):
    record = Record()
    trainer, _ = run(demo_root, tmp_path_factory.mktemp("full"), record)
    callback = next(c for c in trainer.state.callbacks if isinstance(c, DynamicLoadingCallback))
    return record, callback.history


@pytest.mark.slow
def test_demo_raises_the_under_trained_domain(full_run):
    record, history = full_run
    assert [h["first_sample"] for h in history] == [4 * (b + 5) for b in (2, 4, 6, 8, 10)]
    reference = [h["proportion"][DEMO_DOMAINS.index("reference")] for h in history]
    assert reference[0] > 0.25 and all(b > a for a, b in zip(reference, reference[1:])), reference
    # the batches follow: the scheduled change at sample 28 (batch 8) is in force from there on
    assert record.schedules[10][1] == (28, history[0]["proportion"])
    domains = [d for b in range(8, 11) for d in record.batches[b][1]]
    assert domains.count(DEMO_DOMAINS.index("reference")) >= 6, domains


@pytest.mark.slow
def test_crashed_run_resumes_same_batches_and_proportions(full_run, demo_root, tmp_path):
    record, history = full_run
    first = Record()
    with pytest.raises(KeyboardInterrupt):
        run(demo_root, tmp_path, first, CrashAt(6))
    resumed = Record()
    trainer, start = run(demo_root, tmp_path, resumed)
    assert start == 6  # the checkpoint after batch 6, not a fresh start
    assert {b: first.batches[b] for b in range(1, 7)} == {b: record.batches[b] for b in range(1, 7)}
    assert resumed.batches == {b: record.batches[b] for b in range(7, 11)}
    assert resumed.schedules == {b: record.schedules[b] for b in range(7, 11)}
    callback = next(c for c in trainer.state.callbacks if isinstance(c, DynamicLoadingCallback))
    assert callback.history == history


@pytest.mark.slow
def test_two_gloo_ranks_read_the_planned_disjoint_samples(two_rank_pretrain, demo_root):
    tmp, process = two_rank_pretrain  # 6 batches of 4 samples per rank, eval at 3 with a 5-batch lookahead
    assert process.returncode == 0, process.stdout[-4000:] + rank_logs(tmp / "logs")
    recorded = [json.loads((tmp / "batches" / f"rank{r}.json").read_text())["batches"] for r in range(2)]
    for rank in range(2):
        # exactly the stream planned for this rank (seed 17, world size 2, the yaml's initial mix)
        planned = DynamicStreamingDataset(f"{demo_root}/mds", "train", DEMO_DOMAINS, batch_size=4,
                                          proportion=[0.25] * 4, seed=17, rank=rank, world_size=2)  # fmt: skip
        samples = iter(planned)
        expected = [[hashlib.sha1(next(samples)["input_ids"].numpy().tobytes()).hexdigest() for _ in range(4)]
                    for _ in range(6)]  # fmt: skip
        assert recorded[rank] == expected, rank
    draws = [(d, k) for rank in range(2) for d, k in _planned_draws(demo_root, rank)]
    assert len(draws) == len(set(draws)) == 48  # no (domain, sample) drawn twice across the ranks


class Planned(DynamicStreamingDataset):
    """Yields (domain, sample id) instead of reading the sample: the plan itself."""

    def _load(self, d, sample_id):
        return {"plan": (d, sample_id)}


def _planned_draws(demo_root, rank):
    """(domain, sample id) of the first 6 batches of a rank: the plan the recorded batches matched."""
    planned = Planned(f"{demo_root}/mds", "train", DEMO_DOMAINS, batch_size=4, proportion=[0.25] * 4, seed=17,
                      rank=rank, world_size=2)  # fmt: skip
    iterator = iter(planned)
    return [next(iterator)["plan"] for _ in range(24)]


@pytest.mark.slow
def test_state_round_trips_and_reads_the_older_list_form(full_run):
    _, history = full_run  # what eval_after_all really appended: first sample, losses, proportions
    assert len(history) == 5 and all(set(h) == {"first_sample", "losses", "proportion"} for h in history)
    saved = DynamicLoadingCallback(DEMO_DOMAINS, [0.25] * 4, [1.0] * 4)
    saved.history = [dict(entry) for entry in history]
    for state in (saved.state_dict(), {"history": history}):  # as written now / before sharded checkpoints
        loaded = DynamicLoadingCallback(DEMO_DOMAINS, [0.25] * 4, [1.0] * 4)
        loaded.load_state_dict(state)
        assert loaded.history == history
