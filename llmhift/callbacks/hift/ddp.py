"""The Algorithm that lets HiFT run under DDP: Composer's DDP must look for parameters without gradients."""

from __future__ import annotations

from composer import Algorithm, Event, State
from composer.loggers import Logger

__all__ = ["DDPFindUnusedParameters"]


class DDPFindUnusedParameters(Algorithm):
    """Builds Composer's DDP wrapper with ``find_unused_parameters=True``; it does nothing else.

    HiFT trains one group of layers per step, so the other groups get no gradient, and DDP without
    ``find_unused_parameters`` fails on the next step waiting for their reduction. Composer sets that
    flag only from Algorithms (``Algorithm.find_unused_parameters``), never from callbacks, so a Trainer
    that runs :class:`~llmhift.callbacks.hift.HiFTCallback` on several ranks without FSDP needs this in
    ``algorithms=``; the callback refuses to start without it. ``train.py`` adds it itself. Under FSDP,
    and on one process, it is not needed (Composer builds no DDP wrapper then) and has no effect.

    Example:
        >>> trainer = Trainer(model=model, optimizers=torch.optim.AdamW(model.parameters()),
        ...                   callbacks=[HiFTCallback()], algorithms=[DDPFindUnusedParameters()],
        ...                   ...)  # doctest: +SKIP
    """

    @property
    def find_unused_parameters(self) -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        del event, state  # unused
        return False

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        del event, state, logger  # never matched
