"""DownstreamEvalCallback: a small lm-evaluation-harness suite on the model being trained, at intervals."""

from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from composer import Callback, Event, Logger, State, Time, TimeUnit
from composer.callbacks import CheckpointSaver
from composer.utils import create_interval_scheduler, dist, format_name_with_dist
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from llmhift.checkpoint.run_folder import CHECKPOINT_NAME
from llmhift.downstream import evaluate_model, expand_tasks, harness_version, write_results
from llmhift.models.causal_lm import unwrap_model
from llmhift.models.hf_adapter import hf_config_from_llama, llmhift_to_hf_state_dict
from llmhift.models.hf_causal_lm import ComposerHFCausalLM
from llmhift.models.llama import ComposerLlama

__all__ = ["DownstreamEvalCallback", "DOWNSTREAM_KEY", "SECONDS_KEY", "RECORDS_FOLDER", "hf_view", "kept_rng", "FSDP_REFUSAL", "PEFT_REFUSAL",
           "PRUNING_REFUSAL"]

DOWNSTREAM_KEY = "downstream/{task}/{metric}"  # metric: acc, acc_norm (where the task has it)
SECONDS_KEY = "downstream/seconds"  # the wall time of one evaluation: what the callback costs the run
RECORDS_FOLDER = "downstream"  # <folder>/downstream/ba<N>/downstream.json, read by python -m llmhift.report
UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.SAMPLE, TimeUnit.TOKEN)
# What it refuses, in words train.py's config check shares.
PRUNING_REFUSAL = ("the model carries L0 masks (pruning), which a Hugging Face model cannot express; evaluate "
                   "after post-pruning: python -m llmhift.convert.post_pruning prune_and_save_model CKPT, then "
                   "python -m llmhift.evaluate pruned-CKPT")
FSDP_REFUSAL = ("the model is sharded by FSDP, and the callback does not gather it on rank 0 mid-run; drop the "
                "callback and evaluate the saved checkpoints with python -m llmhift.evaluate CKPT")
PEFT_REFUSAL = ("a peft model is evaluated after the run: export it (python -m llmhift.convert.composer_to_hf "
                "save_composer_to_hf CKPT DIR merge_peft=true), then python -m llmhift.evaluate DIR")


def hf_view(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model the harness runs, sharing the trained weights (no copy).

    ``hf_causal_lm``: the wrapped model itself. ``llama``: a ``LlamaForCausalLM`` built on the meta
    device whose tensors are assigned the ComposerLlama's own (the declarative key map of
    :mod:`llmhift.models.hf_adapter`), so an evaluation costs no second copy of the weights."""
    model = unwrap_model(model)
    if isinstance(model, ComposerHFCausalLM):
        if not isinstance(model.model, PreTrainedModel):
            raise ValueError(f"DownstreamEvalCallback: {PEFT_REFUSAL}")
        return model.model
    if isinstance(model, ComposerLlama):
        if model.mask_source is not None:
            raise ValueError(f"DownstreamEvalCallback: {PRUNING_REFUSAL}")
        with torch.device("meta"):
            hf = LlamaForCausalLM(LlamaConfig(**hf_config_from_llama(model.config)))
        hf.load_state_dict(llmhift_to_hf_state_dict(model.model.state_dict(prefix="model.")), assign=True,
                           strict=not model.config.tie_word_embeddings)  # a tied head has no key of its own
        if model.config.tie_word_embeddings:
            hf.tie_weights()
        # The rotary tables are buffers outside the state dict: computed anew where the weights are.
        device = model.model.tok_embeddings.weight.device
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config, device=device)
        return hf.eval()
    raise ValueError(f"DownstreamEvalCallback: cannot evaluate a {type(model).__name__}; it runs on llmhift's "
                     "ComposerLlama (without L0 masks) and ComposerHFCausalLM (model.name: llama or hf_causal_lm)")


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """Restores this process' random generators after the block: the harness seeds them itself, which
    must not change what training draws next (dropout, sampling). Per process, unlike Composer's
    ``get_rng_state``, a collective that rank 0 alone cannot call."""
    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class DownstreamEvalCallback(Callback):
    """Runs lm-evaluation-harness tasks on the model in training every ``interval`` and logs the accuracy.

    Perplexity on held-out text is cheap; whether a pruned or continued model keeps its accuracy on
    downstream tasks is what Sheared-LLaMA reports. This callback answers it during the run: at each
    interval rank 0 evaluates the model as it is (in eval mode, without gradients; train mode and the
    random generators' state are restored after) with :func:`llmhift.downstream.evaluate_model` while the other ranks wait at a
    barrier, logs each task's accuracy, and writes a results record (``stage: checkpoint``, the
    batch and training tokens reached) to ``<folder>/downstream/ba<N>/downstream.json``, which
    ``python -m llmhift.report`` plots as accuracy against training tokens.

    The cost is the harness' forward passes over every example (times the choices of a
    multiple-choice task, and the few-shot context): keep the suite small (``limit``) or the interval
    long. Refused at FIT_START, one line each: a model under FSDP (its weights are sharded across
    ranks; evaluate the saved checkpoints with ``python -m llmhift.evaluate`` instead), a pruning
    model (L0 masks), a peft model, a run without a local folder for the records.

    Args:
        tasks (Sequence[str]): harness task names or suite names (``llmhift.downstream.SUITES``).
        interval (str | int): how often, a Composer time string in ``ba``, ``ep``, ``sp`` or ``tok``
            (an int is in epochs). Required.
        limit (int, optional): at most this many examples per task. Default: ``None`` (all).
        batch_size (int): the harness' batch size. Default: ``1``.
        include_path (str, optional): a folder of extra task yamls (local datasets). Default: ``None``.
        num_fewshot (int, optional): shots for every task. Default: ``None`` (each task's or suite's own).
        tokenizer (str | PreTrainedTokenizerBase, optional): the model's tokenizer, or its folder.
            Default: ``None`` (the model's own ``tokenizer``; train.py passes the yaml's).
        folder (str, optional): where the records go (``{run_name}`` allowed). Default: ``None`` (the
            Trainer's local ``save_folder``).

    Example:
        >>> from composer import Trainer
        >>> callback = DownstreamEvalCallback(tasks=["piqa"], interval="500ba", limit=100, tokenizer="tok")
        >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration="2000ba", save_folder="ck",
        ...                   callbacks=[callback])  # doctest: +SKIP

    ================================= ==========================================================
    Key                               Logged
    ================================= ==========================================================
    ``downstream/<task>/acc``         the task's accuracy at the interval
    ``downstream/<task>/acc_norm``    its length-normalised accuracy, where the task has one
    ``downstream/seconds``            the evaluation's wall time (rank 0; the other ranks wait)
    ================================= ==========================================================
    """

    def __init__(self, tasks: Sequence[str], interval: str | int, limit: int | None = None, batch_size: int = 1,
                 include_path: str | os.PathLike | None = None, num_fewshot: int | None = None,
                 tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
                 folder: str | None = None) -> None:
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"tasks: a non-empty list of task or suite names, got {tasks!r}")
        try:
            unit = Time.from_input(interval, TimeUnit.EPOCH)
        except (ValueError, TypeError):
            unit = None
        if unit is None or unit.unit not in UNITS or unit.value <= 0:
            raise ValueError(f"interval: a positive time in {[u.value for u in UNITS]} such as 500ba, got {interval!r}")
        for name, value in (("limit", limit), ("batch_size", batch_size), ("num_fewshot", num_fewshot)):
            low = 0 if name == "num_fewshot" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name}: an int >= {low}, got {value!r}")
        if include_path is not None and not Path(include_path).is_dir():
            raise ValueError(f"include_path: {include_path} is not a folder of task yamls")
        if isinstance(tokenizer, (str, os.PathLike)) and not Path(tokenizer).is_dir():
            raise ValueError(f"tokenizer: {tokenizer} is not a tokenizer folder")
        self.include_path = None if include_path is None else str(include_path)
        self.specs = expand_tasks(list(tasks), num_fewshot, include_path=self.include_path)  # unknown names refused
        self.limit, self.batch_size = limit, batch_size
        self.tokenizer, self.folder = tokenizer, folder
        self.due = create_interval_scheduler(interval, include_end_of_training=False, checkpoint_events=False)

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if state.fsdp_config is not None:
            raise ValueError(f"DownstreamEvalCallback: {FSDP_REFUSAL}")
        hf_view(state.model)  # refuses a model it cannot evaluate before the first batch
        if self.folder is None:
            savers = [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)]
            if not savers:
                raise ValueError("DownstreamEvalCallback: no folder for its records; give the Trainer a "
                                 "save_folder, or the callback folder=...")
            self.folder = savers[0].folder
        if "://" in self.folder:
            raise ValueError(f"DownstreamEvalCallback: folder {self.folder} is remote; give folder= a local path")
        if self.tokenizer is None:
            self.tokenizer = getattr(unwrap_model(state.model), "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError("DownstreamEvalCallback: the model has no tokenizer; pass tokenizer= its folder "
                                 "(train.py passes the yaml's tokenizer.name)")
        if isinstance(self.tokenizer, (str, os.PathLike)):
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer, local_files_only=True)

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.due(state, Event.BATCH_END):
            return
        if dist.get_global_rank() == 0:
            self._evaluate(state, logger)
        dist.barrier()  # the other ranks wait while rank 0 evaluates

    def _evaluate(self, state: State, logger: Logger) -> None:
        start = time.perf_counter()
        model = unwrap_model(state.model)
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), kept_rng():
                hf = hf_view(model)
                device = "cuda" if next(hf.parameters()).is_cuda else "cpu"
                results = evaluate_model(hf, self.tokenizer, self.specs, limit=self.limit, batch_size=self.batch_size,
                                         device=device, include_path=self.include_path)
        finally:
            model.train(training)
        logger.log_metrics({DOWNSTREAM_KEY.format(task=task, metric=metric): value
                            for task, metrics in results.items() for metric, value in metrics.items()
                            if metric in ("acc", "acc_norm")})
        logger.log_metrics({SECONDS_KEY: time.perf_counter() - start})
        write_results(self._record_folder(state), self._record(state, results))

    def _record_folder(self, state: State) -> Path:
        folder = Path(format_name_with_dist(self.folder, state.run_name))
        return folder / RECORDS_FOLDER / f"ba{int(state.timestamp.batch)}"

    def _record(self, state: State, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The evaluated model is named by the checkpoint its batch has (or would have) in the folder, so
        the report groups a run's records with the checkpoints ``python -m llmhift.evaluate`` reads."""
        stamp = state.timestamp
        name = CHECKPOINT_NAME.format(epoch=int(stamp.epoch), batch=int(stamp.batch), rank=0)
        folder = Path(format_name_with_dist(self.folder, state.run_name)).absolute()
        tokens = int(stamp.token)
        return {"model": str(folder / name), "stage": "checkpoint", "tokens": tokens or None,
                "batch": int(stamp.batch), "harness": harness_version(),
                "tasks": results}
