"""PruningCallback: drives an L0Module's schedule and Lagrangian inside a vanilla Composer fit."""

from __future__ import annotations

from typing import Any

import torch
from composer import Callback, Logger, State
from composer.utils.parallelism import FSDPConfig

from llmhift.models.causal_lm import unwrap_model
from llmhift.models.l0_module import HELD_LR_KEY, L0Module

__all__ = ["PruningCallback", "LM_LOSS", "EXPECTED_SPARSITY_KEY", "TARGET_SPARSITY_KEY", "EXPECTED_PARAMS_KEY",
           "TARGET_PARAMS_KEY"]

# Keys of the table below that readers of the logs (llmhift.report) use; ``{}`` is the mask name.
EXPECTED_SPARSITY_KEY = "pruning/expected_sparsity/{}"
TARGET_SPARSITY_KEY = "pruning/target_sparsity/{}"
EXPECTED_PARAMS_KEY = "pruning/expected_params"
TARGET_PARAMS_KEY = "pruning/target_params"
LM_LOSS = "lm"  # the loss entry without the penalty: Composer logs it as loss/train/lm


def _l0_module(state: State) -> L0Module:
    l0 = getattr(unwrap_model(state.model), "mask_source", None)
    if not isinstance(l0, L0Module):
        raise ValueError(
            "callbacks.pruning: the model has no L0Module; add model.l0_module: {pruning_modules: [...], "
            "target_model: {...}} to the yaml (or pass mask_source=L0Module(...) to ComposerLlama)"
        )
    return l0


def _hold_fixed_lrs(state: State) -> None:
    """Undoes the LR schedule on groups marked ``HELD_LR_KEY`` (Composer scales every group alike)."""
    for optimizer in state.optimizers:
        for group in optimizer.param_groups:
            if HELD_LR_KEY in group:
                group["lr"] = group[HELD_LR_KEY]


def _optimizer_problem(state: State, l0: L0Module) -> str | None:
    """The first way the optimizers' groups differ from :func:`pruning_param_groups`'s, or None.

    Checked by identity against the module's parameters as they are at FIT_START: under FSDP2 the
    groups then hold the same sharded DTensors as the module, and on resume the loaded groups.
    """
    roles = {id(p): (f"z_loga.{name}", 1) for name, p in l0.z_loga.items()}
    for prefix, table in (("lambda_1", l0.lambda_1), ("lambda_2", l0.lambda_2)):
        roles.update({id(p): (f"{prefix}.{name}", -1) for name, p in table.items()})
    unseen = {name for name, _ in roles.values()}
    for optimizer in state.optimizers:
        for group in optimizer.param_groups:
            held = group.get(HELD_LR_KEY)
            for param in group["params"]:
                if id(param) not in roles:
                    continue
                name, sign = roles[id(param)]
                unseen.discard(name)
                if held is None:
                    return f"{name} is in a group the LR schedule scales"
                if not held * sign > 0:
                    return f"{name} is held at {held}, needs a {'positive' if sign > 0 else 'negative'} rate"
    if unseen:
        return f"{sorted(unseen)[0]} is in no optimizer group"
    return None


class PruningCallback(Callback):
    """Targeted structured pruning (Sheared-LLaMA) with the model's :class:`L0Module`.

    At each batch start it hands the step to the L0 module (which warms the target sparsities up
    from it) and holds the mask and lambda optimizer groups at their fixed learning rates (``lag_lr``
    and ``-lag_lr``; the LR schedule scales only the model's groups). After each loss it adds the
    Lagrangian penalty, so the masks move toward the target and the lambdas, trained by gradient
    ascent, tighten the constraint. After each optimizer step the log-alphas are clamped into range.
    Evaluation uses the L0 module's deterministic masks (``eval_target_model`` picks the exact target).
    The optimizer's groups come from :func:`~llmhift.models.l0_module.pruning_param_groups`; at
    FIT_START the callback refuses any other layout (say, AdamW over ``model.parameters()``, which
    would schedule the masks and descend on the lambdas: a run that trains, but does not prune).
    Masks and lambdas are model parameters, checkpointed with it; the step is this callback's state.

    FSDP: FSDP2 (train.py's default) shards the L0 module with the model (Composer wraps each child of
    the model); the penalty is then computed in a call of the module, where its parameters are
    gathered, and the metrics inside :meth:`L0Module.gathered`. All ranks apply the same gates at a
    step, so a sharded run trains like one process (``tests/test_fsdp_pruning.py``). FSDP1 wraps the
    module in flat parameters this callback cannot read and is refused.

    Args:
        log_interval (int): log the pruning metrics every this many batches. Default: ``1``.

    Example:
        >>> from composer import Trainer
        >>> l0 = L0Module(config, {"n_heads": 2, "n_layers": 3}, ["head", "layer"])
        >>> model = ComposerLlama(config, mask_source=l0)
        >>> optimizer = DecoupledAdamW(pruning_param_groups(model, lag_lr=1.0), lr=3e-3)
        >>> trainer = Trainer(model=model, optimizers=optimizer, train_dataloader=loader,
        ...                   callbacks=[PruningCallback()])  # doctest: +SKIP

    +---------------------------------------------+---------------------------------------------------+
    | Key                                         | Logged value                                      |
    +=============================================+===================================================+
    | ``pruning/expected_sparsity/<mask>``        | expected fraction of zero gates (mean over rows)  |
    | ``pruning/target_sparsity/<mask>``          | the warmed-up target at this step                 |
    | ``pruning/lambda_1/<mask>``                 | linear Lagrange multiplier                        |
    | ``pruning/lambda_2/<mask>``                 | quadratic Lagrange multiplier                     |
    | ``pruning/lagrangian_loss``                 | the penalty added to the LM loss                  |
    | ``pruning/expected_params``                 | expected non-embedding parameters                 |
    | ``pruning/target_params``                   | non-embedding parameters of the target shape      |
    | ``pruning/shape/<field>``                   | d_model, n_heads, n_kv_heads, n_layers,           |
    |                                             | intermediate_size of the current deterministic    |
    |                                             | masks                                             |
    +---------------------------------------------+---------------------------------------------------+
    The loss is logged as ``loss/train/lm``, ``loss/train/lagrangian`` and ``loss/train/total``.
    """

    def __init__(self, log_interval: int = 1) -> None:
        if not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"callbacks.pruning.log_interval: must be a positive int, got {log_interval!r}")
        self.log_interval = log_interval
        self.step = 0

    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if isinstance(state.fsdp_config, FSDPConfig):
            raise ValueError("fsdp_config: pruning needs FSDP2 (train.py's default: unset FSDP_VERSION=1; with a "
                             "Trainer of your own, set FSDP_VERSION=2); "
                             "FSDP1 hides the L0 module inside flat parameters the pruning callback cannot read")

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        l0 = _l0_module(state)
        problem = _optimizer_problem(state, l0)
        if problem is not None:
            raise ValueError(f"PruningCallback: the optimizer does not train the L0 masks as pruning needs "
                             f"({problem}); build it from llmhift.models.l0_module.pruning_param_groups(model, lag_lr), e.g. "
                             "DecoupledAdamW(pruning_param_groups(model, lag_lr=1.0), lr=...)")
        l0.set_step(self.step)

    def batch_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        self.step = int(state.timestamp.batch)
        _l0_module(state).set_step(self.step)
        _hold_fixed_lrs(state)

    def after_loss(self, state: State, logger: Logger) -> None:
        del logger  # unused
        penalty = _l0_module(state)(lagrangian=True)  # a call, so that FSDP2 gathers the parameters
        lm = state.loss["total"] if isinstance(state.loss, dict) else state.loss
        state.loss = {LM_LOSS: lm, "lagrangian": penalty, "total": lm + penalty}

    def batch_end(self, state: State, logger: Logger) -> None:
        _hold_fixed_lrs(state)  # again after scheduler.step, so LR monitors log the rate really used
        l0 = _l0_module(state)
        l0.constrain_parameters()
        if int(state.timestamp.batch) % self.log_interval == 0:  # the same batches on every rank
            logger.log_metrics(self.metrics(l0))

    @staticmethod
    def metrics(l0: L0Module) -> dict[str, float]:
        """Everything the table above lists, as plain floats (a collective under FSDP2: all ranks call it)."""
        with torch.no_grad(), l0.gathered():
            values: dict[str, float] = {}
            for name in l0.masks:
                values[EXPECTED_SPARSITY_KEY.format(name)] = l0.expected_sparsity(name).mean().item()
                values[TARGET_SPARSITY_KEY.format(name)] = l0.target_sparsity(name)
                values[f"pruning/lambda_1/{name}"] = l0.lambda_1[name].item()
                values[f"pruning/lambda_2/{name}"] = l0.lambda_2[name].item()
            values["pruning/lagrangian_loss"] = l0.lagrangian().item()
            values[EXPECTED_PARAMS_KEY] = l0.expected_params().item()
            values[TARGET_PARAMS_KEY] = float(l0.non_embedding_params(l0.target))
            for key, size in l0.current_shape().items():
                values[f"pruning/shape/{key}"] = float(size)
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
