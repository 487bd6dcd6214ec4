"""The training yaml: llm-foundry's layout as typed dataclasses, CLI overrides, and early validation.

A run is described by one yaml plus ``dotted.key=value`` overrides. Everything that can be checked
without building the model is checked here, before the first heavy step, and every error names the
key and, where there is one, the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from composer.core import Time, TimeUnit
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmhift.errors import ConfigError

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "LoaderConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "device_batch_sizes",
    "check_times",
    "PRECISIONS",
]

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")


@dataclass
class DatasetConfig:
    """MDS folders written by ``llmhift.datasets.prepare``: ``<local>/<split>/<domain>/``."""

    local: str = MISSING
    remote: Optional[str] = None  # streaming's remote (s3://, gs://, ...); shards are cached in `local`
    split: str = "train"
    domains: Optional[list[str]] = None  # default: every domain folder found under <local>/<split>
    shuffle: bool = True
    shuffle_seed: int = 17
    max_seq_len: Optional[int] = None  # when given, must equal the shards' sequence length
    proportion: Optional[list[float]] = None  # `dynamic` only: initial mix (default: domain sizes)
    lookahead_batches: int = 32  # `dynamic` only: batches until a proportion change applies (> workers*prefetch)
    tokenizer: Optional[str] = None  # `instruction` only: local tokenizer folder (reads <local>/<split>.jsonl)
    # `instruction` only: {system, human, bot} -> text around {content} (default: llmhift's), or `tokenizer` for
    # the tokenizer's own chat_template. Any, as OmegaConf has no str-or-dict type; check_data checks it.
    chat_template: Any = None
    # `instruction` only: several conversations per row (true), within a task; `mixed`: across tasks too
    packing: Any = False
    # `instruction` only, several tasks (MFTCoder): task folders (relative to `local`), or {task: folder or jsonl}
    tasks: Any = None
    task_names: Optional[list[str]] = None  # `instruction` only: instead of tasks, each line's `data_name`


@dataclass
class LoaderConfig:
    name: str = "text"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    drop_last: bool = True
    num_workers: int = 0
    prefetch_factor: Optional[int] = None
    persistent_workers: bool = False
    pin_memory: bool = False
    timeout: float = 0.0


@dataclass
class TokenizerConfig:
    name: str = MISSING  # a local tokenizer folder (AutoTokenizer.from_pretrained, offline)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: str = "decoupled_adamw"
    lr: float = 1e-4
    lag_lr: Optional[float] = None  # pruning only: masks train at lag_lr, Lagrange multipliers at -lag_lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: Optional[float] = None  # sgd only (null: 0, plain SGD; llmhift.build.optimizers)
    nesterov: bool = False  # sgd only, with a positive momentum


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"
    t_warmup: str = "0ba"
    alpha_f: float = 0.0


@dataclass
class TrainConfig:
    """Every top-level key a training yaml may hold. Free-form sections (``model``, ``callbacks``,
    ``loggers``, ``algorithms``, ``fsdp_config``) are checked by the builders that consume them."""

    model: dict[str, Any] = MISSING
    train_loader: LoaderConfig = MISSING
    max_duration: str = MISSING
    global_train_batch_size: int = MISSING
    tokenizer: Optional[TokenizerConfig] = None
    eval_loader: Optional[LoaderConfig] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    algorithms: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    loggers: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)
    device_train_microbatch_size: Any = None  # an int, or "auto" (GPU only); default: no accumulation
    device_eval_batch_size: int = 8
    eval_interval: str = "1ep"
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    precision: str = "fp32"
    fsdp_config: Optional[dict[str, Any]] = None
    seed: int = 17
    run_name: Optional[str] = None
    save_folder: Optional[str] = None
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: Optional[str] = None  # a Composer checkpoint to resume from (all state)
    load_weights_only: bool = False
    demo_data: Optional[str] = None  # build llmhift's embedded demo corpus here when missing
    progress_bar: bool = True
    log_to_console: bool = True
    console_log_interval: str = "10ba"
    dist_timeout: float = 600.0

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def _schema_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "config"
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    return ConfigError(f"{key}: {message}")


# A dotted key: names of letters, digits, `_` or `-`, joined by single dots (list items by index: `betas.0`).
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")


def _read_yaml(yaml_path: Path) -> Any:
    """The yaml file as an OmegaConf node; a syntax error names the file, line and column."""
    try:
        return OmegaConf.load(yaml_path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{yaml_path} line {mark.line + 1} column {mark.column + 1}" if mark else str(yaml_path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        lines = yaml_path.read_text(errors="replace").splitlines()
        line = lines[mark.line] if mark and mark.line < len(lines) else ""
        fix = "indent with spaces: yaml does not allow tabs" if "\t" in line else "fix the yaml syntax there"
        raise ConfigError(f"yaml: {where}: {problem}; {fix}") from None


def _read_overrides(overrides: Sequence[str]) -> Any:
    """The ``dotted.key=value`` overrides as one OmegaConf node; the first malformed one is named."""
    nodes = []
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not _OVERRIDE_KEY.fullmatch(key):
            raise ConfigError(f"overrides: expected dotted.key=value (e.g. optimizer.lr=1e-4), got {override!r}")
        try:
            nodes.append(OmegaConf.from_dotlist([override]))
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{key}: the value in {override!r} is not valid yaml ({problem}); "
                              "quote it, or close its brackets") from None
    return OmegaConf.merge(*nodes) if nodes else OmegaConf.create()


def load_config(yaml_path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads the yaml, applies ``dotted.key=value`` overrides, resolves ``${variables.*}`` and
    checks keys and types against :class:`TrainConfig`."""
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise ConfigError(f"yaml: {yaml_path} does not exist")
    from_cli = _read_overrides(overrides)
    from_file = _read_yaml(yaml_path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), from_file, from_cli)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _schema_error(err) from None
    assert isinstance(config, TrainConfig)
    _check(config)
    return config


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """The same validation for a config built in Python (tests, notebooks)."""
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(values)))
    except OmegaConfBaseException as err:
        raise _schema_error(err) from None
    _check(config)
    return config


# Units each time setting accepts. Composer reads a bare number as wall-clock seconds ("5" is 50 s),
# which no llmhift setting means, and `dur` (a fraction of max_duration) cannot define max_duration.
TRAINING_UNITS = (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN)
INTERVAL_UNITS = (*TRAINING_UNITS, TimeUnit.DURATION)
_UNIT_NAMES = {TimeUnit.EPOCH: "epochs", TimeUnit.BATCH: "batches", TimeUnit.SAMPLE: "samples",
               TimeUnit.TOKEN: "tokens", TimeUnit.DURATION: "fraction of max_duration"}


def _time(key: str, value: str, units: Sequence[TimeUnit]) -> Time:
    text = str(value).strip()
    try:
        time = Time.from_timestring(text)
    except (ValueError, TypeError):
        time = None
    if time is None or time.unit not in units:
        allowed = ", ".join(f"{u.value} ({_UNIT_NAMES[u]})" for u in units)
        example = f"{text}ba" if text.isdigit() else "1000ba"
        raise ConfigError(f"{key}: {value!r} is not a duration here; give a count with a unit, one of {allowed} "
                          f"(e.g. {example})")
    return time


def _comparable_unit(unit: TimeUnit) -> TimeUnit:
    """The unit a warmup scheduler compares in: Composer converts epochs to batches before the check."""
    return TimeUnit.BATCH if unit == TimeUnit.EPOCH else unit


def check_times(config: TrainConfig) -> None:
    """Every time string parses with a unit its setting accepts, and the warmup can be compared with
    max_duration (Composer's warmup schedulers refuse two different units, deep inside Trainer())."""
    duration = _time("max_duration", config.max_duration, TRAINING_UNITS)
    for key in ("eval_interval", "save_interval", "console_log_interval"):
        _time(key, getattr(config, key), INTERVAL_UNITS)
    warmup = _time("scheduler.t_warmup", config.scheduler.t_warmup, INTERVAL_UNITS)
    if warmup.unit != TimeUnit.DURATION and _comparable_unit(warmup.unit) != _comparable_unit(duration.unit):
        raise ConfigError(
            f"scheduler.t_warmup: {config.scheduler.t_warmup} is in {_UNIT_NAMES[warmup.unit]} but max_duration "
            f"{config.max_duration} in {_UNIT_NAMES[duration.unit]}; give the warmup in {duration.unit.value} "
            "or as a fraction of the run (e.g. 0.05dur)"
        )


def _check(config: TrainConfig) -> None:
    check_times(config)
    if config.device_eval_batch_size < 1:
        raise ConfigError(f"device_eval_batch_size: must be a positive number of samples, got "
                          f"{config.device_eval_batch_size}")
    if config.optimizer.lr < 0:
        raise ConfigError(f"optimizer.lr: must be >= 0, got {config.optimizer.lr} (pruning's negative rate for "
                          "the Lagrange multipliers comes from optimizer.lag_lr)")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision: {config.precision!r} is not one of {PRECISIONS}")
    if config.global_train_batch_size < 1:
        raise ConfigError(f"global_train_batch_size: must be positive, got {config.global_train_batch_size}")
    micro = config.device_train_microbatch_size
    if micro is not None and micro != "auto" and (isinstance(micro, bool) or not isinstance(micro, int) or micro < 1):
        raise ConfigError(f"device_train_microbatch_size: must be a positive int or 'auto', got {micro!r}")
    if config.autoresume and not (config.save_folder and config.run_name):
        raise ConfigError("autoresume: needs both save_folder and run_name (Composer finds the checkpoint by them)")
    if not isinstance(config.model, dict) or "name" not in config.model:
        raise ConfigError("model.name: missing; use 'llama' (llmhift's decoder) or 'hf_causal_lm'")


def device_batch_sizes(config: TrainConfig, world_size: int, on_gpu: bool) -> tuple[int, int | str]:
    """(per-rank batch, per-rank micro-batch) from the global batch; refuses what does not divide."""
    global_batch = config.global_train_batch_size
    if global_batch % world_size:
        raise ConfigError(
            f"global_train_batch_size: {global_batch} does not divide over {world_size} ranks; "
            f"use a multiple of {world_size}"
        )
    device_batch = global_batch // world_size
    micro = config.device_train_microbatch_size
    if micro is None:
        return device_batch, device_batch
    if micro == "auto":
        if not on_gpu:
            raise ConfigError("device_train_microbatch_size: 'auto' needs a GPU; give an int on CPU")
        return device_batch, micro
    if device_batch % micro:
        raise ConfigError(
            f"device_train_microbatch_size: {micro} does not divide the per-rank batch {device_batch} "
            f"(global_train_batch_size {global_batch} / {world_size} ranks)"
        )
    return device_batch, micro

