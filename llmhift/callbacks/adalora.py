"""AdaLoRAAllocator: runs AdaLoRA's rank budget schedule and orthogonality penalty inside a Composer run."""

from __future__ import annotations

from typing import Any

import torch
from composer import Callback, State
from composer.loggers import Logger

from llmhift.models.causal_lm import unwrap_model
from llmhift.models.peft import find_peft_model

__all__ = ["AdaLoRAAllocator", "BUDGET_KEY", "HIFT_REFUSAL"]

BUDGET_KEY = "adalora/ranks"  # ranks kept over all adapted matrices after the step's allocation
# Said by the yaml check and by the callback on a plain Trainer, in the same words.
HIFT_REFUSAL = ("callbacks.hift: AdaLoRA's rank allocator scores every adapter's gradient at every step and HiFT "
                "leaves inactive blocks without one; drop callbacks.hift or use lora/ia3")


class AdaLoRAAllocator(Callback):
    """AdaLoRA's side of training that ``peft`` leaves to the training loop.

    ``peft``'s AdaLoRA starts every adapted matrix at ``init_r`` ranks and prunes the least important
    singular values down to a total of ``target_r`` per matrix between steps ``tinit`` and
    ``total_step - tfinal`` (cubic schedule, every ``deltaT`` steps). It needs the optimizer step and
    the gradients, so the loop must call ``update_and_allocate(step)`` after each optimizer step and
    before gradients are cleared: here at ``BATCH_END``, where Composer has stepped and not yet zeroed.
    AdaLoRA also adds ``orth_reg_weight`` times the mean ``||P Pᵀ - I||_F`` of its singular-vector
    factors to the loss; ``peft`` does so only when the model computes the loss from ``labels``, which
    llmhift's causal LM wrapper does not pass, so it is added here at ``AFTER_LOSS``.

    The allocator's importance averages live in this callback's checkpoint state: a resumed run
    allocates as the uninterrupted one would. HiFT cannot drive AdaLoRA (the allocator scores every
    adapter's gradient at every step, and HiFT gives inactive blocks none): refused at ``INIT``.

    Example:
        >>> model = ComposerHFCausalLM(wrap_peft(hf_model, {"type": "adalora", "init_r": 8, "target_r": 2},
        ...                                      total_steps=1000))  # doctest: +SKIP
        >>> Trainer(model=model, max_duration="1000ba", callbacks=[AdaLoRAAllocator()], ...)  # doctest: +SKIP

    ============== ===========================================================
    Key            Logged
    ============== ===========================================================
    adalora/ranks  ranks kept over all adapted matrices after the step (BATCH_END)
    ============== ===========================================================
    """

    def __init__(self) -> None:
        self._adalora: Any = None
        self._loaded: dict[str, Any] = {}

    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        from peft.tuners.adalora import AdaLoraModel

        from llmhift.callbacks.hift import HiFTCallback

        wrapped = find_peft_model(unwrap_model(state.model))
        if wrapped is None or not isinstance(wrapped.base_model, AdaLoraModel):
            raise ValueError("model: AdaLoRAAllocator needs a peft AdaLoRA model (model.peft.type: adalora); "
                             "drop the callback for other models")
        if any(isinstance(c, HiFTCallback) for c in state.callbacks):
            raise ValueError(HIFT_REFUSAL)
        self._adalora = wrapped.base_model
        self._apply(self._loaded)

    def after_loss(self, state: State, logger: Logger) -> None:
        del logger  # unused
        weight = self._config.orth_reg_weight
        if weight:
            state.loss = state.loss + weight * self.orthogonality()

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch) - 1  # Composer has counted the step just taken
        self._adalora.update_and_allocate(step)
        logger.log_metrics({BUDGET_KEY: self.ranks()})

    @property
    def _config(self) -> Any:
        return self._adalora.peft_config[self._adalora.trainable_adapter_name]

    def _factors(self) -> list[tuple[str, torch.nn.Parameter]]:
        adapter = self._adalora.trainable_adapter_name
        return [(n, p) for n, p in self._adalora.model.named_parameters()
                if ("lora_A" in n or "lora_B" in n) and adapter in n]

    def orthogonality(self) -> torch.Tensor:
        """Mean over the adapters' P (lora_A, r x in) and Q (lora_B, out x r) of ``||P Pᵀ - I||_F``
        (``||Qᵀ Q - I||_F``): AdaLoRA keeps them near-orthogonal so that E holds the singular values."""
        terms = []
        for name, p in self._factors():
            gram = p @ p.T if "lora_A" in name else p.T @ p  # (r, r)
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=p.dtype, device=p.device)))
        return torch.stack(terms).mean()

    def ranks(self) -> int:
        """Ranks kept over all adapted matrices: ``init_r`` each until the first allocation."""
        pattern = self._config.rank_pattern
        if not pattern:
            return self._config.init_r * sum("lora_E" in n for n, _ in self._adalora.model.named_parameters())
        return sum(sum(kept) for kept in pattern.values())

    # --- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._adalora is None:
            return {}
        allocator = self._adalora.rankallocator
        return {"exp_avg_ipt": dict(allocator.exp_avg_ipt), "exp_avg_unc": dict(allocator.exp_avg_unc),
                "ipt": dict(allocator.ipt), "rank_pattern": self._config.rank_pattern}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state
        if self._adalora is not None:
            self._apply(state)

    def _apply(self, state: dict[str, Any]) -> None:
        if not state:
            return
        allocator = self._adalora.rankallocator
        params = dict(self._adalora.model.named_parameters())
        for key in ("exp_avg_ipt", "exp_avg_unc", "ipt"):  # a checkpoint loads onto the CPU
            getattr(allocator, key).update({n: t.to(params[n].device) for n, t in state[key].items()})
        self._config.rank_pattern = state["rank_pattern"]
