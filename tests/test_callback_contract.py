"""Every llmhift callback through the same Composer life cycle, as Composer tests its own callbacks.

Each callback runs from its demo yaml, exactly as a user starts it: it fits at micro-batch sizes 1
and 2, survives FIT_START/FIT_END twice (a second ``fit`` on the same Trainer), closes twice, and
its ``state_dict`` round-trips into a fresh instance.
"""

import copy

import pytest
import torch
from composer.loggers import Logger

from llmhift.build.config import load_config
from llmhift.build.trainer import CALLBACKS, build_trainer
from llmhift.callbacks import (
    CheckpointMetadataCallback,
    DistillationCallback,
    DownstreamEvalCallback,
    DynamicLoadingCallback,
    HiFTCallback,
    PruningCallback,
    TaskBalanceCallback,
)
from tests.choice_task import CHOICE_TASK, write_choice_task
from tests.helpers import save_hf_llama

# Callbacks train.py adds to every run, whatever the yaml names.
ALWAYS = {"checkpoint_metadata": ("yamls/demo/prune.yaml", CheckpointMetadataCallback)}
CASES = {
    "pruning": ("yamls/demo/prune.yaml", PruningCallback),
    "data_loading": ("yamls/demo/pretrain.yaml", DynamicLoadingCallback),
    "hift": ("yamls/demo/hift.yaml", HiFTCallback),
    "distillation": ("yamls/demo/continue_distill.yaml", DistillationCallback),
    "task_balance": ("yamls/demo/mft.yaml", TaskBalanceCallback),
    "downstream": ("yamls/demo/pretrain.yaml", DownstreamEvalCallback),
    **ALWAYS,
}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_registered_llmhift_callback_is_covered():
    ours = {name for name, factory in CALLBACKS.items() if factory.__module__.startswith("llmhift.")}
    assert ours == set(CASES) - set(ALWAYS)
    for name in ours:
        assert CALLBACKS[name] is CASES[name][1]


# task_balance's loss is exact under any accumulation (tests/test_mft.py): at micro-batch 2 (accumulation 2)
# its life cycle is the same as at 1, so it runs once
ONE_MICROBATCH = {"task_balance": 2}


@pytest.mark.slow
@pytest.mark.parametrize("name, microbatch", [(name, microbatch) for name in sorted(CASES) for microbatch in (1, 2)
                                              if ONE_MICROBATCH.get(name, microbatch) == microbatch])
def test_callback_life_cycle(name, microbatch, demo_root, tmp_path):
    yaml, cls = CASES[name]
    overrides = [
        f"variables.data_root={demo_root}",
        f"save_folder={tmp_path / 'ckpt'}",
        "max_duration=2ba",
        "eval_interval=2ba",
        "save_interval=2ba",
        "eval_subset_num_batches=2",
        "global_train_batch_size=4",
        f"device_train_microbatch_size={microbatch}",
        "device_eval_batch_size=4",
        "progress_bar=false",
        "log_to_console=false",
    ]
    if name == "hift":
        overrides.append(f"variables.instructions={tmp_path / 'instructions'}")
        if microbatch == 2:  # BAdam's block schedule: a group holds K optimizer steps
            overrides.append("callbacks.hift.switch_every=2")
    if name == "task_balance":
        overrides += [f"variables.tasks={tmp_path / 'tasks'}", "model.loss_balance=self_paced"]
    if name == "downstream":  # a local multiple-choice task, evaluated at every interval
        tasks = write_choice_task(tmp_path / "tasks")
        overrides.append(f"callbacks.downstream={{tasks: [{CHOICE_TASK}], interval: 2ba, limit: 2, "
                         f"include_path: {tasks}}}")
    if name == "distillation":  # the student as its own teacher: a small LLaMA of the demo vocabulary
        model = save_hf_llama(tmp_path / "model", demo_root / "tokenizer", hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=128)
        overrides += [f"variables.pruned_model={model}", f"variables.teacher={model}"]
    config = load_config(yaml, overrides)
    trainer = build_trainer(config)
    callback = next(cb for cb in trainer.state.callbacks if isinstance(cb, cls))

    trainer.fit()
    trainer.fit(duration="2ba")  # FIT_START and FIT_END a second time, on the same objects
    assert int(trainer.state.timestamp.batch) == 4
    loss = trainer.state.loss
    assert torch.isfinite(loss["total"] if isinstance(loss, dict) else loss).all()

    # As Composer restores it on resume: a new run's callback, past INIT, then loaded.
    state = callback.state_dict()
    other = build_trainer(load_config(yaml, overrides[:1] + [f"save_folder={tmp_path / 'other'}"] + overrides[2:]))
    fresh = next(cb for cb in other.state.callbacks if isinstance(cb, cls))
    fresh.load_state_dict(copy.deepcopy(state))
    assert same(fresh.state_dict(), state)
    other.close()

    logger = Logger(trainer.state)
    trainer.close()
    callback.close(trainer.state, logger)  # closing again is harmless
    callback.post_close()
