"""One build path from a validated TrainConfig to a vanilla composer.Trainer.

Cheap checks and objects come first (data folders, callbacks, loggers), the model and data loaders
last, so that a typo costs a second, not a model load.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from composer import Algorithm, Callback, Evaluator, Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import Time, TimeUnit
from composer.loggers import FileLogger, LoggerDestination
from composer.models import ComposerModel
from composer.optim import (
    ComposerScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmhift.atomic import atomic_file
from llmhift.build.config import ConfigError, LoaderConfig, TrainConfig, device_batch_sizes
from llmhift.build.optimizers import check_optimizer, make_optimizer
from llmhift.build.parallel import average_gloo_fsdp2_gradients, on_gpu, parallelism_config
from llmhift.build.resolve import (
    Resolution,
    declared_llama_config,
    resolve_hf_section,
    resolve_llama_section,
    resolve_model_section,
)
from llmhift.callbacks.adalora import HIFT_REFUSAL, AdaLoRAAllocator
from llmhift.callbacks.checkpoint_metadata import CheckpointMetadataCallback
from llmhift.callbacks.distillation import DistillationCallback
from llmhift.callbacks.downstream import FSDP_REFUSAL, PEFT_REFUSAL, PRUNING_REFUSAL, DownstreamEvalCallback
from llmhift.callbacks.dynamic_loading import DynamicLoadingCallback
from llmhift.callbacks.hift import DDPFindUnusedParameters, HiFTCallback
from llmhift.callbacks.hift.callback import PARAM_DTYPES
from llmhift.callbacks.hift.schedule import find_units
from llmhift.callbacks.pruning import PruningCallback
from llmhift.callbacks.task_balance import TaskBalanceCallback
from llmhift.checkpoint.io import TOKENIZER_FILES_KEY, read_llama_weights, source_metadata, tokenizer_files
from llmhift.checkpoint.run_folder import AtomicCheckpointSaver, checkpoint_problem, prepare_run_folder
from llmhift.datasets.demo_data import ensure_demo_data
from llmhift.datasets.dynamic_streaming import DynamicStreamingDataset, check_proportion
from llmhift.datasets.instruction import InstructionDataset, check_instruction_dataset
from llmhift.datasets.instruction_tasks import (
    MultiTaskInstructionDataset,
    TaskMixDataset,
    check_task_dataset,
    has_tasks,
)
from llmhift.datasets.text import DataFolderError, EverySample, MultiDomainTextDataset, find_domains, sequence_length
from llmhift.loggers import EVAL_LABEL, JsonlLogger
from llmhift.models.causal_lm import build_task_loss
from llmhift.models.hf_adapter import ConversionError, infer_llama_config
from llmhift.models.hf_causal_lm import ComposerHFCausalLM
from llmhift.models.l0_module import L0Module, pruning_param_groups
from llmhift.models.llama import ComposerLlama, LlamaConfig
from llmhift.models.peft import peft_config, quantization_config, wrap_peft

__all__ = [
    "CALLBACKS",
    "LOGGERS",
    "ALGORITHMS",
    "check_data",
    "check_dynamic_loader",
    "build_callbacks",
    "build_loggers",
    "build_algorithms",
    "build_llama_config",
    "resolve_model",
    "build_l0_module",
    "build_model",
    "build_dataloader",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "check_config",
    "check_optimization",
    "check_tokenizer",
    "check_precision",
    "check_activation_checkpointing",
    "check_sequence_length",
    "check_load_path",
    "check_hift",
    "check_peft",
    "check_distillation",
    "check_downstream",
    "build_teacher",
    "TEACHER_KEY",
    "save_resolved_config",
]

# Names the yaml may use under `callbacks:`, `loggers:` and `algorithms:`, and what they build.
CALLBACKS: dict[str, Callable[..., Callback]] = {
    "lr_monitor": LRMonitor,
    "speed_monitor": SpeedMonitor,
    "memory_monitor": MemoryMonitor,
    "optimizer_monitor": OptimizerMonitor,
    "runtime_estimator": RuntimeEstimator,
    "pruning": PruningCallback,
    "data_loading": DynamicLoadingCallback,
    "task_balance": TaskBalanceCallback,  # added by itself when the train data has tasks (llama)
    "hift": HiFTCallback,
    "distillation": DistillationCallback,  # teacher: a path, loaded by build_teacher (see build_callbacks)
    "downstream": DownstreamEvalCallback,  # off unless named; the yaml's tokenizer is passed (build_callbacks)
}


def _tensorboard(**kwargs: Any) -> LoggerDestination:
    from composer.loggers import TensorboardLogger

    return TensorboardLogger(**kwargs)


def _wandb(**kwargs: Any) -> LoggerDestination:
    from composer.loggers import WandBLogger

    return WandBLogger(**kwargs)


def _mlflow(**kwargs: Any) -> LoggerDestination:
    from composer.loggers import MLFlowLogger

    return MLFlowLogger(**kwargs)


LOGGERS: dict[str, Callable[..., LoggerDestination]] = {
    "tensorboard": _tensorboard,
    "wandb": _wandb,
    "mlflow": _mlflow,
    "file": FileLogger,
    "jsonl": JsonlLogger,  # every metric to a JSON-lines file, read by `python -m llmhift.report`
}
ALGORITHMS: dict[str, Callable[..., Algorithm]] = {"gradient_clipping": GradientClipping}
SCHEDULERS = ("cosine_with_warmup", "constant_with_warmup", "linear_decay_with_warmup")
MODELS = ("llama", "hf_causal_lm")


def _build_named(section: str, registry: Mapping[str, Callable[..., Any]], entries: Mapping[str, Any]) -> list[Any]:
    built = []
    for name, kwargs in entries.items():
        if name not in registry:
            raise ConfigError(f"{section}.{name}: unknown; available: {sorted(registry)}")
        try:
            built.append(registry[name](**(kwargs or {})))
        except (TypeError, ValueError, ImportError) as err:
            raise ConfigError(f"{section}.{name}: {err}") from err
    return built


def build_callbacks(config: TrainConfig) -> list[Callback]:
    """The yaml's callbacks, plus the one that makes every checkpoint carry its model's config and source."""
    tokenizer = config.tokenizer.name if config.tokenizer else None
    metadata = CheckpointMetadataCallback(source=config.model.get("pretrained"), tokenizer=tokenizer)
    entries = dict(config.callbacks)
    if "distillation" in entries:  # the yaml names the teacher's path; the callback loads it at FIT_START
        section = dict(entries["distillation"] or {})
        section["teacher"] = functools.partial(build_teacher, config, _teacher_path(section, must_exist=False))
        entries["distillation"] = section
    if "downstream" in entries:
        entries["downstream"] = _downstream_section(config)
    if has_tasks(config.train_loader.dataset) and config.model.get("name") == "llama" and "task_balance" not in entries:
        entries["task_balance"] = {}  # the model's TaskLoss needs each global batch's per-task counts
    built = [*_build_named("callbacks", CALLBACKS, entries), metadata]
    if (config.model.get("peft") or {}).get("type") == "adalora":
        built.append(AdaLoRAAllocator())  # AdaLoRA's rank schedule runs in the training loop
    return built


def build_loggers(config: TrainConfig) -> list[LoggerDestination]:
    return _build_named("loggers", LOGGERS, config.loggers)


def build_algorithms(config: TrainConfig) -> list[Algorithm]:
    return _build_named("algorithms", ALGORITHMS, config.algorithms)


def _loader_sections(config: TrainConfig) -> list[tuple[str, LoaderConfig]]:
    sections = [("train_loader", config.train_loader)]
    if config.eval_loader is not None:
        sections.append(("eval_loader", config.eval_loader))
    return sections


def check_data(config: TrainConfig) -> dict[str, list[str]]:
    """Builds the demo corpus if the yaml asks for it, then checks every loader's folders and
    domains; returns each loader's domains. Remote data is checked when it is read."""
    if config.demo_data:
        ensure_demo_data(config.demo_data)
    domains = {}
    for section, loader in _loader_sections(config):
        allowed = ["text", "dynamic", "instruction"] if section == "train_loader" else ["text", "instruction"]
        if loader.name not in allowed:
            raise ConfigError(f"{section}.name: {loader.name!r} is not a known loader here; available: {allowed}")
        dataset = loader.dataset
        if loader.name == "instruction":
            try:
                if has_tasks(dataset):  # tasks are the domains of instruction data (per-task metrics, mixing)
                    domains[section] = check_task_dataset(dataset, build_demo=bool(config.demo_data))
                else:
                    check_instruction_dataset(dataset, build_demo=bool(config.demo_data))
                    domains[section] = []  # one stream of conversations: no per-domain metrics
            except ValueError as err:
                raise ConfigError(f"{section}.dataset.{err}") from None
            continue
        if dataset.remote:
            if not dataset.domains:
                raise ConfigError(f"{section}.dataset.domains: required with a remote (folders cannot be listed)")
            domains[section] = list(dataset.domains)
            continue
        try:
            domains[section] = find_domains(dataset.local, dataset.split, dataset.domains)
        except DataFolderError as err:
            raise ConfigError(f"{section}.dataset.local: {err}") from None
        length = sequence_length(Path(dataset.local) / dataset.split / domains[section][0])
        if dataset.max_seq_len is not None and dataset.max_seq_len != length:
            raise ConfigError(
                f"{section}.dataset.max_seq_len: {dataset.max_seq_len}, but the shards hold {length}-token samples"
            )
    if config.train_loader.name == "dynamic" or "data_loading" in config.callbacks \
            or has_tasks(config.train_loader.dataset):
        check_dynamic_loader(config, domains["train_loader"])
    if config.eval_loader is not None and domains["eval_loader"] != domains["train_loader"]:
        raise ConfigError(
            f"eval_loader.dataset.domains: {domains['eval_loader']} differ from the train domains "
            f"{domains['train_loader']}; per-domain metrics need the same list in the same order"
        )
    return domains


def check_tokenizer(config: TrainConfig) -> None:
    """The tokenizer folder exists and fits the model's vocabulary (a larger tokenizer would index
    past the embedding table mid-run)."""
    if config.tokenizer is None:
        return
    folder = Path(config.tokenizer.name)
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer.name: {folder} is not a local tokenizer folder (llmhift never downloads)")
    vocab = config.model.get("vocab_size")
    if config.model.get("name") == "llama" and vocab is not None:
        size = len(AutoTokenizer.from_pretrained(folder, **config.tokenizer.kwargs))
        if size > vocab:
            raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {size} tokens ({folder})")


def build_llama_config(model_section: Mapping[str, Any]) -> LlamaConfig:
    """The LlamaConfig of a ``llama`` model section: ``model.pretrained``'s own architecture, the
    yaml's fields as checked overrides (see :mod:`llmhift.build.resolve`)."""
    return LlamaConfig.from_dict(resolve_llama_section(model_section).fields)


def _report(resolution: Resolution) -> None:
    """The resolution's warning lines on stderr, once per run (rank 0)."""
    if dist.get_global_rank() == 0:
        for line in resolution.warnings:
            print(f"warning: {line}", file=sys.stderr)


def resolve_model(config: TrainConfig, missing_ok: bool = False) -> Resolution:
    """Resolves ``config.model`` against ``model.pretrained`` and puts the resolved section in its
    place, so that every later check, the memory estimate and the saved config.yaml see the
    architecture that is built, not only the fields the yaml happened to spell out."""
    if config.model["name"] not in MODELS:
        raise ConfigError(f"model.name: {config.model['name']!r} is not one of {MODELS}")
    resolution = resolve_model_section(config.model, missing_ok)
    config.model = resolution.section
    return resolution


def build_l0_module(config: TrainConfig) -> L0Module | None:
    """The L0 masks of a pruning yaml (``model.l0_module``), checked against the rest of the run."""
    section = config.model.get("l0_module")
    if section is None:
        return None
    if config.model.get("name") != "llama":
        raise ConfigError("model.l0_module: pruning needs model.name: llama")
    if "pruning" not in config.callbacks:
        raise ConfigError("model.l0_module: needs callbacks.pruning ({} is enough), which drives the masks")
    if config.optimizer.lag_lr is None:
        raise ConfigError("optimizer.lag_lr: required with model.l0_module (learning rate of the masks, e.g. 1.0)")
    if not config.optimizer.lag_lr > 0:
        raise ConfigError(f"optimizer.lag_lr: must be positive, got {config.optimizer.lag_lr} (the masks' "
                          "learning rate, e.g. 1.0; the Lagrange multipliers take its negative)")
    try:
        return L0Module.from_dict(build_llama_config(config.model), {"seed": config.seed, **section})
    except (TypeError, ValueError) as err:
        message = str(err)
        raise ConfigError(message if message.startswith("model.") else f"model.l0_module: {message}") from None


def _load_pretrained_llama(model: ComposerLlama, path: str, key: str = "model.pretrained") -> None:
    """Fills a decoder built on the meta device with a checkpoint's weights, strictly: the checkpoint's
    shapes must be the yaml's (a 7B checkpoint does not silently half-load into a 1.3B yaml).

    The checkpoint is memory-mapped and each tensor is copied into a parameter of its own (cast to the
    parameter's dtype) as it is reached, so memory peaks at one copy of the weights, with no random
    initialisation to overwrite first."""
    try:
        weights = read_llama_weights(path)
        shape = {k: getattr(model.config, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                       "n_kv_heads", "head_dim", "intermediate_size",
                                                       "tie_word_embeddings")}
        infer_llama_config(weights, shape)
    except ConversionError as err:
        raise ConfigError(f"{key}: {path}: {err}") from None
    expected = {f"model.{name}" for name in model.model.state_dict()}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:  # same shapes, other sublayers: layers_without_attn / layers_without_mlp differ
        raise ConfigError(
            f"{key}: {path} holds other tensors than the yaml's model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); check model.layers_without_attn and model.layers_without_mlp"
        )
    # A tied head is the embedding itself (no lm_head parameter), so assigning cannot untie it.
    loaded = {
        name: torch.empty(meta.shape, dtype=meta.dtype).copy_(weights.pop(f"model.{name}"))
        for name, meta in model.model.state_dict().items()
    }
    model.model.load_state_dict(loaded, strict=True, assign=True)


def _store_in_hift_dtype(config: TrainConfig, model: ComposerModel) -> None:
    """Casts HiFT's parameters to ``callbacks.hift.param_dtype`` now, on the CPU. HiFT would cast them at
    INIT, but Composer moves the model to the GPU first: a 7B model would arrive there in fp32 (27 GB)
    and not fit the 24 GB cards HiFT's bf16 weights are meant for. The same cast as HiFT's, so the
    weights are the same either way; FSDP runs refuse ``param_dtype`` (HiFTCallback)."""
    dtype = PARAM_DTYPES.get((config.callbacks.get("hift") or {}).get("param_dtype"))
    if dtype is None or config.fsdp_config:
        return
    params = dict(model.named_parameters())
    for _, names in find_units(model):
        for name in names:
            params[name].data = params[name].data.to(dtype)


def build_model(config: TrainConfig, eval_domains: list[str] | None = None, tasks: list[str] | None = None) -> ComposerModel:
    """The yaml's model. A llama with ``model.pretrained`` is built on the meta device and filled from
    the checkpoint. Under FSDP only rank 0 materialises the decoder (reading the checkpoint, or
    initialising at random); the other ranks leave it on the meta device and read no weights (only
    the architecture: a config.json or the config a checkpoint stores), and
    Composer broadcasts rank 0's weights into every rank's shards while wrapping (FSDP2 turns
    ``sync_module_states`` on by itself when it sees rank 0 materialised and the others not; FSDP1
    gets it from ``parallelism_config``). FSDP2's broadcast goes one tensor at a time
    (``set_model_state_dict`` with ``broadcast_from_rank0``), each rank keeping its slice, so a rank
    other than 0 holds its shard plus one full tensor at most; rank 0 holds the model plus its shard
    (what every rank would hold if all read). A node thus holds one copy of the weights, not one per
    rank (bench/rank0_loading.py measures it). DDP and single-process runs load on every rank."""
    section = dict(config.model)
    name = section["name"]
    balance = {k: section.pop(k) for k in ("loss_balance", "focal_gamma") if k in section}
    if name == "llama":
        pretrained = section.get("pretrained")  # resolving checks that it exists: every rank stats, none reads weights
        llama = build_llama_config(section)
        broadcast = bool(config.fsdp_config) and dist.get_global_rank() != 0
        # tasks: the train data's (multi-task instruction), weighed by model.loss_balance (check_loss_balance)
        model = ComposerLlama(llama, mask_source=build_l0_module(config), eval_domains=eval_domains or (),
                              init_device="meta" if pretrained or broadcast else None, tasks=tasks or (), **balance)
        _store_in_hift_dtype(config, model)  # before loading: a pretrained checkpoint is read straight into it
        if pretrained and not broadcast:
            _load_pretrained_llama(model, pretrained)
        return model
    if name == "hf_causal_lm":
        resolve_hf_section(section)  # a yaml key contradicting config.json is refused, not silently applied
        kwargs = {k: v for k, v in section.items() if k not in ("name", "pretrained", "peft")}
        adapters = section.get("peft")
        try:
            if adapters is not None and adapters.get("quantize") is not None:
                kwargs["quantization_config"] = quantization_config(adapters)
            model = ComposerHFCausalLM.from_pretrained(section["pretrained"], eval_domains=eval_domains or (), **kwargs)
            if adapters is not None:
                model = ComposerHFCausalLM(wrap_peft(model.model, adapters, _total_steps(config)),
                                           eval_domains=eval_domains or ())
            _store_in_hift_dtype(config, model)
            return model
        except (OSError, TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None
    raise ConfigError(f"model.name: {name!r} is not one of {MODELS}")


def check_loss_balance(config: TrainConfig, train_domains: list[str]) -> None:
    """``model.loss_balance`` and ``focal_gamma`` make a valid TaskLoss for the train data's tasks."""
    section = config.model
    if "loss_balance" not in section and "focal_gamma" not in section:
        return
    if section["name"] != "llama":
        raise ConfigError("model.loss_balance: task loss balancing is built into the llama model only; use "
                          "model.name=llama or drop the key (per-task eval losses still work)")
    tasks = train_domains if has_tasks(config.train_loader.dataset) else []
    try:
        build_task_loss(tasks, section.get("loss_balance", "token"), section.get("focal_gamma", 2.0))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.{err}") from None


def check_dynamic_loader(config: TrainConfig, domains: list[str]) -> None:
    """The dynamic stream is endless and applies changes a fixed number of batches ahead."""
    loader = config.train_loader
    if loader.name != "dynamic" and not has_tasks(loader.dataset):
        raise ConfigError("callbacks.data_loading: needs `train_loader.name: dynamic`, or `instruction` with "
                          "dataset.tasks (the text loader's and a single-task instruction loader's mix is fixed)")
    names = list((config.callbacks.get("data_loading") or {}).get("set_names") or domains)
    unknown, unnamed = [d for d in names if d not in domains], [d for d in domains if d not in names]
    if unknown or unnamed:
        raise ConfigError(
            f"callbacks.data_loading.set_names: {unknown} not in the train data, {unnamed} of the data not "
            f"named; the train data holds {domains}"
        )
    if loader.dataset.proportion is not None:
        try:
            check_proportion(loader.dataset.proportion, domains)
        except ValueError as err:
            raise ConfigError(f"train_loader.dataset.{err}") from None
    for key in ("max_duration", "eval_interval", "save_interval"):
        if str(getattr(config, key)).strip().endswith("ep"):
            raise ConfigError(f"{key}: the dynamic (or multi-task) train loader has no epochs; give batches (e.g. 1000ba)")
    in_flight = loader.num_workers * (loader.prefetch_factor or 2) if loader.num_workers else 0
    if loader.dataset.lookahead_batches <= in_flight:
        raise ConfigError(
            f"train_loader.dataset.lookahead_batches: {loader.dataset.lookahead_batches} must exceed "
            f"num_workers x prefetch_factor = {in_flight} (batches that may already be prefetched)"
        )


def build_dataloader(loader: LoaderConfig, domains: list[str], batch_size: int, for_eval: bool = False) -> DataLoader:
    dataset = loader.dataset
    sampler = None
    if loader.name == "instruction" and has_tasks(dataset):
        section = "eval_loader" if for_eval else "train_loader"
        try:
            rows = MultiTaskInstructionDataset(
                dataset.local, dataset.split, AutoTokenizer.from_pretrained(dataset.tokenizer), dataset.max_seq_len,
                dataset.chat_template, dataset.tasks, dataset.task_names, dataset.packing)
        except ValueError as err:
            raise ConfigError(f"{section}.dataset.{err}") from None
        if for_eval:  # every row once over all ranks
            text = rows
            sampler = dist.get_sampler(text, shuffle=False, drop_last=False)
        else:  # the tasks mixed by proportions the data_loading callback may move
            text = TaskMixDataset(rows, batch_size, proportion=dataset.proportion, seed=dataset.shuffle_seed,
                                  lookahead_batches=dataset.lookahead_batches)
    elif loader.name == "instruction":
        section = "eval_loader" if for_eval else "train_loader"
        try:  # the checks ran on one conversation per role order; a later line can still break a template
            text = InstructionDataset(dataset.local, dataset.split, AutoTokenizer.from_pretrained(dataset.tokenizer),
                                      dataset.max_seq_len, dataset.chat_template, dataset.packing)
        except ValueError as err:
            raise ConfigError(f"{section}.dataset.{err}") from None
        sampler = dist.get_sampler(text, shuffle=dataset.shuffle, seed=dataset.shuffle_seed, drop_last=loader.drop_last)
    elif loader.name == "dynamic":
        text = DynamicStreamingDataset(
            local=dataset.local,
            split=dataset.split,
            domains=domains,
            batch_size=batch_size,
            proportion=dataset.proportion,
            remote=dataset.remote,
            seed=dataset.shuffle_seed,
            lookahead_batches=dataset.lookahead_batches,
        )
    else:
        text = MultiDomainTextDataset(
            local=dataset.local,
            split=dataset.split,
            domains=domains,
            batch_size=batch_size,
            remote=dataset.remote,
            shuffle=dataset.shuffle,
            shuffle_seed=dataset.shuffle_seed,
        )
        if for_eval:  # every sample once over all ranks (see EverySample)
            text = EverySample(text)
            sampler = dist.get_sampler(text, shuffle=dataset.shuffle, seed=dataset.shuffle_seed, drop_last=False)
    workers = loader.num_workers
    return DataLoader(
        text,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=workers,
        pin_memory=loader.pin_memory,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers if workers else False,
        timeout=loader.timeout,
    )


def build_optimizer(config: TrainConfig, model: ComposerModel) -> torch.optim.Optimizer:
    opt = config.optimizer
    params: list[Any] = [p for p in model.parameters() if p.requires_grad]
    if isinstance(getattr(model, "mask_source", None), L0Module):
        return make_optimizer(opt, pruning_param_groups(model, opt.lag_lr), pruning=True)
    return make_optimizer(opt, params)


def build_scheduler(config: TrainConfig) -> ComposerScheduler:
    sched = config.scheduler
    if sched.name == "cosine_with_warmup":
        return CosineAnnealingWithWarmupScheduler(t_warmup=sched.t_warmup, alpha_f=sched.alpha_f)
    if sched.name == "constant_with_warmup":
        return ConstantWithWarmupScheduler(t_warmup=sched.t_warmup)
    if sched.name == "linear_decay_with_warmup":
        return LinearWithWarmupScheduler(t_warmup=sched.t_warmup, alpha_f=sched.alpha_f)
    raise ConfigError(f"scheduler.name: {sched.name!r} is not one of {SCHEDULERS}")


def check_optimization(config: TrainConfig, gpu: bool | None = None) -> None:
    """Optimizer (:func:`~llmhift.build.optimizers.check_optimizer`; ``gpu``: whether the run has one,
    None in a dry run) and scheduler, checked before the model is built rather than after."""
    check_optimizer(config.optimizer, pruning=bool(config.model.get("l0_module")), on_gpu=gpu)
    if config.scheduler.name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name: {config.scheduler.name!r} is not one of {SCHEDULERS}")


def check_activation_checkpointing(config: TrainConfig) -> None:
    """Recomputing a block twice (once per mechanism) costs a forward and saves nothing."""
    if (config.fsdp_config or {}).get("activation_checkpointing") and config.model.get("activation_checkpointing"):
        raise ConfigError(
            "fsdp_config.activation_checkpointing and model.activation_checkpointing: both recompute every block; "
            "set one of them to false"
        )


def check_precision(config: TrainConfig) -> None:
    if config.precision != "fp32" and not on_gpu():
        raise ConfigError(f"precision: {config.precision} needs a GPU; on CPU use precision=fp32")


def check_sequence_length(config: TrainConfig, domains: Mapping[str, list[str]]) -> None:
    """The data's samples fit ``model.max_seq_len``: the decoder computes RoPE for any length, so longer
    samples would train silently past the context the yaml (and every export's config) declares."""
    limit = config.model.get("max_seq_len")
    if config.model["name"] != "llama" or limit is None:
        return
    for section, loader in _loader_sections(config):
        dataset = loader.dataset
        if loader.name == "instruction":
            length, where = dataset.max_seq_len, f"{section}.dataset.max_seq_len"
            other_fix = f"set {where}={limit}"
        elif dataset.remote:
            continue  # its index is read when the shards are
        else:
            root = Path(dataset.local) / dataset.split
            length, where = max(sequence_length(root / d) for d in domains[section]), f"the samples of {root}"
            other_fix = f"prepare the data with --max-seq-len {limit}"
        if length is not None and length > limit:
            raise ConfigError(f"model.max_seq_len: {limit} is shorter than {where} ({length} tokens); set "
                              f"model.max_seq_len >= {length}, or {other_fix}")


def check_load_path(config: TrainConfig) -> None:
    """A local ``load_path`` opens as a checkpoint (memory-mapped: its tensors are not read) before
    anything is built: a truncated file would otherwise fail inside ``Trainer()`` with a zip-reader
    traceback, after the model and data are loaded. Remote paths are Composer's to fetch."""
    if not config.load_path or "://" in config.load_path or dist.get_global_rank() != 0:
        return  # rank 0 reads it for all (load_monolith_rank0_only); its refusal stops the launcher's ranks
    path = Path(config.load_path)
    if not path.exists():
        raise ConfigError(f"load_path: {path} does not exist; give a Composer checkpoint (e.g. ep0-ba100-rank0.pt)")
    problem = checkpoint_problem(path)  # a cut file has no zip directory; a cut shard is shorter than .metadata says
    if problem is not None:
        raise ConfigError(f"load_path: {path} does not load ({problem}); point it at a complete checkpoint "
                          "(an earlier ep*-ba*-rank0.pt or sharded ep*-ba* folder)")


def _units_of(config: TrainConfig) -> list[tuple[str, list[str]]] | None:
    """The model's HiFT units, from a copy built on the meta device (no memory, no weights read)."""
    section = config.model
    if section["name"] == "llama":
        model: torch.nn.Module = ComposerLlama(build_llama_config(section), init_device="meta")
    elif section.get("pretrained") and (Path(section["pretrained"]) / "config.json").is_file():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(section["pretrained"],
                                                                                local_files_only=True))
            if section.get("peft") is not None:  # HiFT cycles over the adapters
                model = wrap_peft(model, section["peft"], _total_steps(config))
    else:
        return None  # build_model names what is missing
    return find_units(model)


def check_hift(config: TrainConfig) -> None:
    """``callbacks.hift``'s unit indices and group size against the yaml's model, before the model is
    loaded: the callback checks them again at INIT, which would be after the weights are read."""
    if "hift" not in config.callbacks:
        return
    try:
        hift = HiFTCallback(**(config.callbacks["hift"] or {}))
        units = _units_of(config)
        if units is not None:
            hift.plan(units)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"callbacks.hift: {err}") from None


def _total_steps(config: TrainConfig) -> int | None:
    """The run's length in optimizer steps, when max_duration is given in batches."""
    duration = Time.from_timestring(str(config.max_duration))
    return int(duration.value) if duration.unit == TimeUnit.BATCH else None


def check_peft(config: TrainConfig) -> None:
    """``model.peft``: the method and its settings, before the model is loaded."""
    section = config.model.get("peft")
    if section is None:
        return
    if config.model["name"] != "hf_causal_lm":
        raise ConfigError("model.peft: needs model.name: hf_causal_lm; export the llama checkpoint first "
                          "(python -m llmhift.convert.composer_to_hf save_composer_to_hf CKPT DIR) and set "
                          "model.pretrained: DIR")
    if not isinstance(section, Mapping):
        raise ConfigError(f"model.peft: expected a mapping such as {{type: lora, r: 8}}, got {section!r}")
    try:
        peft_config(section, _total_steps(config))
        quantization_config(section)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if section.get("quantize") is not None and config.fsdp_config:
        raise ConfigError("model.peft.quantize and fsdp_config: FSDP cannot shard bitsandbytes' packed 4-bit weights "
                          "here; drop fsdp_config (QLoRA fits one GPU) or model.peft.quantize")
    if section["type"] == "adalora" and "hift" in config.callbacks:
        raise ConfigError(HIFT_REFUSAL)


TEACHER_KEY = "callbacks.distillation.teacher"


def _teacher_path(section: Mapping[str, Any], must_exist: bool = True) -> str:
    """``callbacks.distillation.teacher``; a dry run away from the cluster may name one not here."""
    path = section.get("teacher")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{TEACHER_KEY}: required: the source model (an HF folder, a Composer checkpoint or a "
                          "sharded checkpoint folder), e.g. the unpruned model the student was pruned from")
    if must_exist and not Path(path).exists():
        raise ConfigError(f"{TEACHER_KEY}: {path} does not exist")
    return path


def _vocab_size(path: str) -> int:
    """Rows of a checkpoint's embedding, from its config (an HF folder's config.json, a checkpoint's
    stored model config) or else its weights' shape (memory-mapped: nothing is read but the header)."""
    if (Path(path) / "config.json").is_file():
        return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
    declared = declared_llama_config(path)
    if declared is not None:
        return int(declared[0]["vocab_size"])
    return read_llama_weights(path)["model.tok_embeddings.weight"].shape[0]


def build_teacher(config: TrainConfig, path: str, init_device: str | None = None) -> ComposerModel:
    """The distillation teacher at ``path``, read like ``model.pretrained`` (any checkpoint llmhift
    reads); built like the student: an ``hf_causal_lm`` student gets an HF teacher from an HF folder,
    otherwise a ComposerLlama with the student's ``attn_impl``. ``init_device="meta"`` gives the
    shapes alone (the dry run's memory estimate)."""
    if config.model["name"] == "hf_causal_lm" and (Path(path) / "config.json").is_file():
        if init_device == "meta":
            with torch.device("meta"):
                hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
            return ComposerHFCausalLM(hf)
        return ComposerHFCausalLM.from_pretrained(path)
    section = {"name": "llama", "pretrained": path}
    if config.model.get("attn_impl"):
        section["attn_impl"] = config.model["attn_impl"]
    try:
        llama = build_llama_config(section)
    except ConfigError as err:
        raise ConfigError(f"{TEACHER_KEY}: {err}") from None
    teacher = ComposerLlama(llama, init_device="meta")
    if init_device != "meta":
        _load_pretrained_llama(teacher, path, TEACHER_KEY)
    return teacher


def check_distillation(config: TrainConfig) -> None:
    """``callbacks.distillation``: its settings, and a teacher that exists and shares the student's
    tokenizer (the same vocabulary size, and the same tokenizer files where both sides have them),
    checked before any weights are read."""
    if "distillation" not in config.callbacks:
        return
    section = dict(config.callbacks["distillation"] or {})
    path = _teacher_path(section)
    try:  # the callback's own checks of the numbers, with a stand-in for the teacher
        DistillationCallback(**{**section, "teacher": torch.nn.Identity()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"callbacks.distillation: {err}") from None
    student = config.model.get("pretrained")
    student_vocab = _vocab_size(student) if config.model["name"] == "hf_causal_lm" else config.model["vocab_size"]
    try:
        teacher_vocab = _vocab_size(path)
        teacher_files = source_metadata(path).get(TOKENIZER_FILES_KEY, {})
    except ConversionError as err:
        raise ConfigError(f"{TEACHER_KEY}: {err}") from None
    if teacher_vocab != student_vocab:
        raise ConfigError(f"{TEACHER_KEY}: {path} has a {teacher_vocab}-token vocabulary, the student "
                          f"{student_vocab}; distil only from a teacher with the student's tokenizer")
    if config.tokenizer is not None and Path(config.tokenizer.name).is_dir():
        where, student_files = config.tokenizer.name, tokenizer_files(config.tokenizer.name)
    else:
        where, student_files = student, source_metadata(student).get(TOKENIZER_FILES_KEY, {}) if student else {}
    differ = sorted(n for n in set(teacher_files) & set(student_files) if teacher_files[n] != student_files[n])
    if differ:
        raise ConfigError(f"{TEACHER_KEY}: {path}'s tokenizer differs from the student's ({where}) in {differ}; "
                          "distil only from a teacher with the student's tokenizer")


def _downstream_section(config: TrainConfig) -> dict[str, Any]:
    """``callbacks.downstream`` with the run's tokenizer (the yaml's, else the pretrained folder's)."""
    section = dict(config.callbacks["downstream"] or {})
    if section.get("tokenizer") is None:
        section["tokenizer"] = config.tokenizer.name if config.tokenizer else config.model.get("pretrained")
    return section


def check_downstream(config: TrainConfig) -> None:
    """``callbacks.downstream``: its settings, and a run it can evaluate, before the model is loaded."""
    if "downstream" not in config.callbacks:
        return
    try:
        DownstreamEvalCallback(**_downstream_section(config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"callbacks.downstream: {err}") from None
    if config.fsdp_config:
        raise ConfigError(f"callbacks.downstream and fsdp_config: {FSDP_REFUSAL}")
    if config.model.get("l0_module") is not None:
        raise ConfigError(f"callbacks.downstream and model.l0_module: {PRUNING_REFUSAL}")
    if config.model.get("peft") is not None:
        raise ConfigError(f"callbacks.downstream and model.peft: {PEFT_REFUSAL}")
    if not (config.callbacks["downstream"] or {}).get("folder") and not config.save_folder:
        raise ConfigError("callbacks.downstream: needs save_folder (its records go to <save_folder>/downstream) "
                          "or callbacks.downstream.folder")


def save_resolved_config(config: TrainConfig) -> None:
    """Writes the run's resolved yaml to ``<save_folder>/config.yaml`` (rank 0, atomically): the
    converters and the post-pruning processor read the model shape from it."""
    if not config.save_folder or "://" in config.save_folder or dist.get_global_rank() != 0:
        return
    folder = Path(config.save_folder.format(run_name=config.run_name))
    with atomic_file(folder / "config.yaml", overwrite=True) as tmp:  # a resumed run's own replaces it
        tmp.write_text(config.to_yaml())


def check_config(config: TrainConfig) -> dict[str, list[str]]:
    """Every check that needs neither the model nor the data loaders; returns each loader's domains.
    Runs in seconds, so a typo fails before anything heavy starts."""
    check_precision(config)
    check_activation_checkpointing(config)
    check_optimization(config, on_gpu())
    check_peft(config)
    _report(resolve_model(config))
    if config.model["name"] == "llama":
        build_l0_module(config)
    domains = check_data(config)
    check_loss_balance(config, domains["train_loader"])
    check_sequence_length(config, domains)
    check_tokenizer(config)
    check_hift(config)
    check_distillation(config)
    check_downstream(config)
    check_load_path(config)
    device_batch_sizes(config, dist.get_world_size(), on_gpu())
    return domains


def build_trainer(config: TrainConfig, eval_only: bool = False) -> Trainer:
    """Everything checked, everything built, a Trainer ready to ``fit()`` (or, with ``eval_only``, to
    ``eval()``: it loads the autoresume checkpoint or ``load_path`` and can write no checkpoint).

    The save folder is locked and checked (and bad checkpoints moved aside) before the model is built;
    ``config.yaml`` is written only once the Trainer exists, so a run that fails anywhere earlier leaves
    another run's folder as it was."""
    domains = check_config(config)
    if eval_only and config.eval_loader is None:
        raise ConfigError("eval_loader: an evaluation-only run (--eval-only, max_duration: 0ba) needs one")
    parallelism = parallelism_config(config)
    callbacks, loggers, algorithms = build_callbacks(config), build_loggers(config), build_algorithms(config)
    if parallelism is None and any(isinstance(c, HiFTCallback) for c in callbacks):
        algorithms.append(DDPFindUnusedParameters())  # DDP on several ranks: inactive groups get no gradient
    device = "gpu" if on_gpu() else "cpu"
    dist.initialize_dist(device, config.dist_timeout)
    claim = prepare_run_folder(config.save_folder, config.run_name, config.autoresume, eval_only)
    if eval_only and config.autoresume and claim.checkpoint is None and not config.load_path \
            and not config.model.get("pretrained"):
        claim.abandon()
        raise ConfigError(f"autoresume: --eval-only found no checkpoint that loads in {config.save_folder}, and "
                          "there is no load_path or model.pretrained; it would evaluate random weights")
    try:  # a build that fails after the claim unlocks, and leaves no folder it created
        batch_size, microbatch_size = device_batch_sizes(config, dist.get_world_size(), on_gpu())

        train_loader = build_dataloader(config.train_loader, domains["train_loader"], batch_size)
        evaluators = []
        if config.eval_loader is not None:
            eval_loader = build_dataloader(config.eval_loader, domains["eval_loader"], config.device_eval_batch_size,
                                           for_eval=True)
            evaluators.append(Evaluator(label=EVAL_LABEL, dataloader=eval_loader))
        reproducibility.seed_all(config.seed)  # the initial weights (and L0 masks) follow the yaml's seed
        model = build_model(config, domains.get("eval_loader"),
                            domains["train_loader"] if has_tasks(config.train_loader.dataset) else None)
        callbacks.append(claim)  # holds the folder's lock while the Trainer lives
        if config.save_folder and "://" not in config.save_folder and not eval_only:
            callbacks.append(AtomicCheckpointSaver(config.save_folder, config.save_interval,
                                                   config.save_num_checkpoints_to_keep, config.save_overwrite))
        trainer = Trainer(
            run_name=config.run_name,
            seed=config.seed,
            model=model,
            train_dataloader=train_loader,
            eval_dataloader=evaluators or None,
            eval_interval=config.eval_interval,
            eval_subset_num_batches=config.eval_subset_num_batches,
            optimizers=build_optimizer(config, model),
            schedulers=build_scheduler(config),
            algorithms=algorithms,
            callbacks=callbacks,
            loggers=loggers,
            max_duration=config.max_duration,
            precision=config.precision,
            device=device,
            device_train_microbatch_size=microbatch_size,
            parallelism_config=parallelism,
            save_folder=None if eval_only else config.save_folder,
            save_interval=config.save_interval,
            save_num_checkpoints_to_keep=config.save_num_checkpoints_to_keep,
            save_overwrite=config.save_overwrite,
            autoresume=config.autoresume and not eval_only,
            load_path=(claim.checkpoint or config.load_path) if eval_only else config.load_path,
            load_weights_only=config.load_weights_only,
            progress_bar=config.progress_bar,
            log_to_console=config.log_to_console,
            console_log_interval=config.console_log_interval,
            dist_timeout=config.dist_timeout,
        )
    except BaseException:
        claim.abandon()
        raise
    average_gloo_fsdp2_gradients(trainer.state.model)  # the Trainer has applied FSDP by now
    if not eval_only:
        save_resolved_config(config)
    return trainer
