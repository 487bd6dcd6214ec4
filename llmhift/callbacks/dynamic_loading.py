"""DoReMi-style dynamic batch loading: move the data mix towards domains whose eval loss lags its target."""

from __future__ import annotations

import json
import warnings
from typing import Any, Sequence

import numpy as np
from composer import Callback, State
from composer.loggers import Logger

from llmhift.loggers import EVAL_LABEL
from llmhift.mixture import DomainMixDataset, check_proportion
from llmhift.models.causal_lm import unwrap_model
from llmhift.models.metrics import DOMAIN_METRIC_SUFFIX

__all__ = ["DynamicLoadingCallback", "doremi_update", "UPDATE_TYPES", "PROPORTION_KEY", "EXCESS_LOSS_KEY"]

UPDATE_TYPES = ("doremi", "doremi_unclamped", "constant")
# The logged keys (the table in the class docstring); ``{}`` is the domain.
PROPORTION_KEY = "metrics/train/{}_weight"
EXCESS_LOSS_KEY = "metrics/train/{}_excess_loss"


def doremi_update(
    proportion: Sequence[float],
    losses: Sequence[float],
    target_loss: Sequence[float],
    eta: float = 1.0,
    smoothing: float = 1e-4,
    clamp: bool = True,
) -> list[float]:
    """One update of the domain weights ``w`` from eval losses ``L`` and targets ``t`` (k domains):

    ``excess = max(L - t, 0)`` (``L - t`` when ``clamp=False``), ``alpha = softmax(log w + eta * excess)``,
    ``w' = (1 - smoothing) * alpha + smoothing / k``. With the clamp a domain already below its target
    keeps its relative weight instead of being pushed down (DoReMi's rule; Sheared-LLaMA's code omits it).
    """
    w, L, t = (np.asarray(v, dtype=np.float64) for v in (proportion, losses, target_loss))
    if not (w.shape == L.shape == t.shape) or w.ndim != 1:
        raise ValueError(
            f"proportion, losses and target_loss need one value per domain; got {w.shape}, {L.shape}, {t.shape}"
        )
    excess = np.maximum(L - t, 0.0) if clamp else L - t  # (k,)
    with np.errstate(divide="ignore"):  # a zero weight has log -inf: it stays at the smoothing floor
        logits = np.log(w) + eta * excess  # (k,)
    alpha = np.exp(logits - logits.max())
    alpha /= alpha.sum()
    return ((1.0 - smoothing) * alpha + smoothing / len(w)).tolist()


class DynamicLoadingCallback(Callback):
    """After each evaluation, re-weights the training mix of domains by their eval loss.

    Reads ``<domain>_LanguageCrossEntropy`` of every domain from the evaluator ``eval_label`` once all
    evaluators have run, computes the new proportions with :func:`doremi_update` and hands them to the
    train loader's :class:`~llmhift.datasets.dynamic_streaming.DynamicStreamingDataset` (or, for
    multi-task instruction data, its :class:`~llmhift.datasets.instruction_tasks.TaskMixDataset`:
    the domains are then tasks, with the same sampler). They take
    effect ``lookahead_batches`` batches later (see the dataset), the same on every rank and in every
    data-loader worker. The proportions in force are part of the dataset's checkpointed state, so a
    resumed run restores them before its first batch; this callback's own state is the update history.

    Args:
        set_names (Sequence[str]): the domains, in the order of ``proportion`` and ``target_loss``;
            must be exactly the train data's domains (any order).
        proportion (Sequence[float]): the initial mix (non-negative, sum 1), used when a run starts
            from its first batch; a resumed run keeps the checkpoint's.
        target_loss (Sequence[float]): the reference loss of each domain.
        update_type (str): ``doremi`` (excess clamped at 0, the paper's rule), ``doremi_unclamped``
            (Sheared-LLaMA's code) or ``constant`` (fixed mix; losses are still logged).
            Default: ``doremi``.
        eta (float): the step size on the excess loss. Default: ``1.0``.
        smoothing (float): the uniform mix-in ``c``. Default: ``1e-4``.
        eval_label (str): the evaluator whose per-domain metrics are read. Default: ``eval``.

    Example:
        >>> callback = DynamicLoadingCallback(["code", "docs"], [0.5, 0.5], [2.0, 3.0])
        >>> trainer = Trainer(model=model, train_dataloader=DataLoader(dynamic_dataset, batch_size=8),
        ...                   eval_dataloader=Evaluator(label="eval", dataloader=eval_loader),
        ...                   eval_interval="100ba", callbacks=[callback], max_duration="1000ba")

    Logged metrics (at the start of a fit and after each evaluation):

    +---------------------------------------+------------------------------------------------------+
    | Key                                   | Logged value                                         |
    +=======================================+======================================================+
    | ``metrics/train/<domain>_weight``     | the domain's latest proportion                       |
    +---------------------------------------+------------------------------------------------------+
    | ``metrics/train/<domain>_excess_loss``| eval loss minus target (clamped at 0 for ``doremi``);|
    |                                       | not logged for a domain without eval tokens          |
    +---------------------------------------+------------------------------------------------------+
    """

    def __init__(
        self,
        set_names: Sequence[str],
        proportion: Sequence[float],
        target_loss: Sequence[float],
        update_type: str = "doremi",
        eta: float = 1.0,
        smoothing: float = 1e-4,
        eval_label: str = EVAL_LABEL,
    ) -> None:
        self.set_names = list(set_names)
        repeated = sorted({d for d in self.set_names if self.set_names.count(d) > 1})
        if repeated or not self.set_names:
            raise ValueError(f"set_names: need unique domain names, got {self.set_names}")
        if update_type not in UPDATE_TYPES:
            raise ValueError(f"update_type: {update_type!r} is not one of {UPDATE_TYPES}")
        if len(target_loss) != len(self.set_names):
            raise ValueError(f"target_loss: {len(target_loss)} values for {len(self.set_names)} set_names")
        for key, value in (("eta", eta), ("smoothing", smoothing)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key}: must be a number, got {type(value).__name__} {value!r}")
        if eta < 0 or not 0 <= smoothing <= 1:
            raise ValueError(f"eta ({eta}) must be >= 0 and smoothing ({smoothing}) in [0, 1]")
        self.proportion = check_proportion(proportion, self.set_names, "proportion")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in target_loss):
            raise ValueError(f"target_loss: must be numbers, got {list(target_loss)}")
        self.target_loss = [float(t) for t in target_loss]
        self.update_type, self.eta, self.smoothing, self.eval_label = update_type, eta, smoothing, eval_label
        self.history: list[dict[str, Any]] = []  # one entry per update: first sample, losses, proportions
        self._dataset: DomainMixDataset | None = None
        self._order: list[int] = []  # dataset domain i is set_names[_order[i]]

    def _attach(self, state: State) -> DomainMixDataset:
        dataset = getattr(state.train_dataloader, "dataset", None)
        if not isinstance(dataset, DomainMixDataset):
            raise TypeError(
                f"callbacks.data_loading needs the train loader to read a DynamicStreamingDataset (or a dataset "
                f"with llmhift.mixture.DomainMixDataset's members), got {type(dataset).__name__}; "
                "set `train_loader.name: dynamic`, or give the instruction loader dataset.tasks (a task mix)"
            )
        missing = [d for d in self.set_names if d not in dataset.domains]
        extra = [d for d in dataset.domains if d not in self.set_names]
        if missing or extra:
            raise ValueError(
                f"callbacks.data_loading.set_names: {missing or ''} not in the train data"
                f"{'' if not extra else f'; data domains {extra} missing from set_names'}"
                f" (the data has {dataset.domains})"
            )
        self._dataset, self._order = dataset, [self.set_names.index(d) for d in dataset.domains]
        return dataset

    def _current(self) -> list[float]:
        assert self._dataset is not None
        current = [0.0] * len(self.set_names)
        for i, p in enumerate(self._dataset.proportion):
            current[self._order[i]] = p
        return current

    def _log_weights(self, logger: Logger) -> None:
        logger.log_metrics({PROPORTION_KEY.format(d): p for d, p in zip(self.set_names, self._current())})

    def _check_eval(self, state: State) -> None:
        """The evaluator this callback reads must exist and give a loss per domain: otherwise the mix
        would silently never move, or the run would fail at its first evaluation."""
        if self.update_type == "constant":
            return
        evaluator = next((e for e in state.evaluators if e.label == self.eval_label), None)
        if evaluator is None:
            warnings.warn(
                f"DynamicLoadingCallback: no evaluator {self.eval_label!r} (have "
                f"{[e.label for e in state.evaluators]}), so the mix stays at its initial proportions; pass "
                f"eval_dataloader=Evaluator(label={self.eval_label!r}, ...) or set update_type='constant'",
                stacklevel=2,
            )
            return
        model = unwrap_model(state.model)
        metrics = model.get_metrics(is_train=False)
        missing = [d for d in self.set_names if f"{d}{DOMAIN_METRIC_SUFFIX}" not in metrics]
        if missing:
            raise ValueError(
                f"DynamicLoadingCallback: the model has no per-domain eval loss for {missing} (metric "
                f"<domain>{DOMAIN_METRIC_SUFFIX}); build it with eval_domains={self.set_names} in the eval "
                "data's domain order, e.g. ComposerLlama(config, eval_domains=domains)"
            )

    def fit_start(self, state: State, logger: Logger) -> None:
        dataset = self._attach(state)
        self._check_eval(state)
        if int(state.timestamp.sample) == 0 and not self.history:
            dataset.set_proportion([self.proportion[j] for j in self._order], num_samples=0)
        self._log_weights(logger)

    def _eval_losses(self, state: State) -> list[float | None]:
        metrics = state.eval_metrics.get(self.eval_label)
        if metrics is None:
            raise KeyError(
                f"callbacks.data_loading.eval_label: no evaluator {self.eval_label!r}; "
                f"have {sorted(state.eval_metrics)}"
            )
        losses: list[float | None] = []
        for d in self.set_names:
            metric = metrics.get(f"{d}{DOMAIN_METRIC_SUFFIX}")
            if metric is None:
                raise KeyError(
                    f"the {self.eval_label!r} evaluator has no {d}{DOMAIN_METRIC_SUFFIX}: its loader must hold "
                    f"domain {d!r}"
                )
            # has_data and compute are collectives: every rank calls both, for every domain.
            has_data = metric.has_data()
            value = float(metric.compute())
            losses.append(value if has_data else None)
        return losses

    def eval_after_all(self, state: State, logger: Logger) -> None:
        dataset = self._dataset or self._attach(state)
        losses = self._eval_losses(state)
        absent = [d for d, loss in zip(self.set_names, losses) if loss is None]
        if absent:
            warnings.warn(
                f"DynamicLoadingCallback: domain(s) {absent} had no eval tokens, so they count as at their target "
                "loss (excess 0, nothing logged for them); raise eval_subset_num_batches (-1: the whole eval set) "
                "or give the eval set samples of every domain",
                stacklevel=2,
            )
        # A domain without eval data sits exactly at its target, so only the other domains move it.
        filled = [t if loss is None else loss for loss, t in zip(losses, self.target_loss)]
        excess = [loss - t for loss, t in zip(filled, self.target_loss)]
        if self.update_type != "doremi_unclamped":
            excess = [max(e, 0.0) for e in excess]
        logger.log_metrics({EXCESS_LOSS_KEY.format(d): e
                            for d, e, loss in zip(self.set_names, excess, losses) if loss is not None})
        if self.update_type == "constant":
            return
        new = doremi_update(self._current(), filled, self.target_loss, self.eta, self.smoothing,
                            clamp=self.update_type == "doremi")
        start = dataset.set_proportion([new[j] for j in self._order], num_samples=int(state.timestamp.sample))
        self.history.append({"first_sample": start, "losses": filled, "proportion": new})
        self._log_weights(logger)

    def state_dict(self) -> dict[str, Any]:
        # One JSON string, not a list of dicts: a sharded (torch distributed) checkpoint flattens dicts
        # inside lists into one key per entry and loads into the keys of the resuming run's own state,
        # whose history is still empty, so a list would fail to resume ("Missing key ...history").
        return {"history": json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state["history"]  # a list in checkpoints written before it became a JSON string
        self.history = [dict(entry) for entry in (json.loads(history) if isinstance(history, str) else history)]
