"""CheckpointMetadataCallback: every checkpoint carries what its model is and where it came from."""

from __future__ import annotations

import os
from typing import Any

from composer import Callback, Logger, State
from composer.utils import dist

from llmhift.checkpoint.io import (
    L0_MODULE_KEY,
    METADATA_CALLBACK,
    MODEL_CONFIG_KEY,
    TOKENIZER_FILES_KEY,
    metadata_from_state,
    metadata_state,
    source_metadata,
    tokenizer_files,
)
from llmhift.models.causal_lm import unwrap_model
from llmhift.models.hf_adapter import ConversionError
from llmhift.models.l0_module import TARGET_KEYS, L0Module
from llmhift.models.llama import ComposerLlama
from llmhift.models.peft import PEFT_CONFIG_KEY, peft_config_dict

__all__ = ["CheckpointMetadataCallback", "l0_module_config"]


def l0_module_config(l0: L0Module) -> dict[str, Any]:
    """The arguments of :meth:`L0Module.from_dict` that rebuild ``l0`` on its source config, with the
    target written out in full (a yaml may leave keys to default to the source's)."""
    return {
        "target_model": {key: getattr(l0.target, key) for key in TARGET_KEYS},
        "pruning_modules": list(l0.pruning_modules),
        "lagrangian_warmup_steps": l0.warmup_steps,
        "start_sparsity": l0.start_sparsity,
        "eval_target_model": l0.eval_target_model,
        "seed": l0.seed,
    }


class CheckpointMetadataCallback(Callback):
    """Stores the model's config, and what its source model had, in every checkpoint the Trainer writes.

    The tools that read a checkpoint later (``prune_and_save_model``, ``save_composer_to_hf``,
    ``model.pretrained`` of the next run) take the architecture from the checkpoint itself, not from a
    yaml that may have been edited or overwritten since, and an export keeps what the source model had:
    its ``config.json`` (``max_position_embeddings``, special token ids, rope settings),
    ``generation_config.json`` and tokenizer files. The metadata is this callback's ``state_dict()``,
    which Composer writes into file and sharded checkpoints alike (``state.callbacks``, under the name
    ``llmhift.checkpoint.io.METADATA_CALLBACK``); ``llmhift.checkpoint.io.stored_metadata(path)``
    reads it back. It is collected at INIT: the model's config (``ComposerLlama``: ``config.to_dict()``,
    and the ``L0Module``'s arguments when pruning; a ``peft`` model: its adapter config) and, with ``source``, the source's metadata (an HF
    folder's files, or what a Composer checkpoint or ``pruned-*.pt`` itself carries, passed on). Rank 0
    reads the source's files and broadcasts them: other ranks read nothing of the source.

    On resume the stored metadata is loaded and the new run's own takes precedence where it knows a
    field, so a run resumed without ``model.pretrained`` still passes on its source's files. train.py adds
    this callback to every run; with a plain Trainer, add it yourself. Only one instance per Trainer:
    Composer keys callback state by class name.

    Args:
        source (str | os.PathLike, optional): what the model was loaded from (``model.pretrained``): an HF
            folder, a Composer checkpoint (file or sharded folder) or a ``pruned-*.pt``. Default: ``None``
            (trained from scratch).
        tokenizer (str | os.PathLike, optional): the run's tokenizer folder, stored when the source
            carries no tokenizer files. Default: ``None``.

    Example:
        >>> from composer import Trainer
        >>> trainer = Trainer(model=ComposerLlama(config), train_dataloader=loader, max_duration="10ba",
        ...                   save_folder="ck",
        ...                   callbacks=[CheckpointMetadataCallback(source="hf/llama")])  # doctest: +SKIP
        >>> stored_metadata("ck/latest-rank0.pt")["hf_config"]["eos_token_id"]  # doctest: +SKIP

    Logs nothing.
    """

    # Composer names callback state by __qualname__; pinning it to the readers' constant keeps the
    # writer and the readers in step even if this class is renamed.
    __qualname__ = METADATA_CALLBACK

    def __init__(self, source: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.metadata: dict[str, Any] = {}

    def _read_files(self) -> dict[str, Any]:
        metadata = source_metadata(self.source) if self.source else {}
        if TOKENIZER_FILES_KEY not in metadata and self.tokenizer:
            metadata[TOKENIZER_FILES_KEY] = tokenizer_files(self.tokenizer)
        return metadata

    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        # Rank 0 reads the files and sends them to the other ranks, which read nothing of the source (as
        # under FSDP, where they load no weights either): every rank then holds the same state, which a
        # sharded checkpoint stores once, from any rank.
        read: list[Any] = [None, None]
        if dist.get_global_rank() == 0:
            try:
                read[0] = self._read_files()
            except (ConversionError, OSError, ValueError) as err:
                read[1] = f"{type(err).__name__}: {err}"
        dist.broadcast_object_list(read, src=0)
        if read[1] is not None:
            raise ConversionError(f"model.pretrained: {self.source}: cannot read its metadata: {read[1]}")
        metadata = read[0]
        model = unwrap_model(state.model)
        if isinstance(model, ComposerLlama):
            metadata[MODEL_CONFIG_KEY] = model.config.to_dict()
            if isinstance(model.mask_source, L0Module):
                metadata[L0_MODULE_KEY] = l0_module_config(model.mask_source)
        adapters = peft_config_dict(model)
        if adapters is not None:  # what save_composer_to_hf rebuilds the adapters from, to merge or save them
            metadata[PEFT_CONFIG_KEY] = adapters
        self.metadata = metadata

    def state_dict(self) -> dict[str, Any]:
        return metadata_state(self.metadata)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metadata = {**metadata_from_state(state), **self.metadata}
