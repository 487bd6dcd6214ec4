"""HiFT: hierarchical full-parameter fine-tuning, one group of layers trained per optimizer step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
from composer import Algorithm, Callback, Event, State
from composer.callbacks import CheckpointSaver
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.file_helpers import format_name_with_dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from llmhift.atomic import NoSpaceError, check_inputs, claim_directory, is_no_space

__all__ = ["HiFTCallback"]

STRATEGIES = ("down2up", "up2down", "random")
STATE_MODES = ("keep", "reset")
PARAM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLOAD_COMMAND = "HiFTCallback.offload_dir"  # the marker of a rank's offload folder


class _FindUnusedParameters(Algorithm):
    """Composer builds DDP with ``find_unused_parameters`` only when an Algorithm asks for it; inactive
    groups produce no gradient, so HiFT must ask (a callback cannot)."""

    @property
    def find_unused_parameters(self) -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return False

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        del event, state, logger  # never matched


class HiFTCallback(Callback):
    """Trains one group of units per optimizer step, cycling over the model; only the active group's
    optimizer state (and fp32 master weights) sits on the accelerator.

    Units are found from the module structure, not from parameter names: the input embedding (with a
    tied LM head and any other embedding table), each block of the model's largest ``nn.ModuleList``,
    the rest after the blocks (the final norm), and the LM head (a ``Linear`` with vocabulary outputs).
    Only parameters that require grad when the Trainer is built count, so a ``peft`` model cycles over
    its adapters; empty units are dropped. Consecutive units form groups of ``group_element``; a cycle
    visits each of the C groups once, switching at ``BATCH_START`` so that every micro-batch of a step
    trains the same group. Every step of cycle k uses the learning rate the Trainer's schedule gives at
    batch ``k * C``: the schedule keeps meaning ``max_duration`` (not stretched C times). Inactive
    groups' optimizer state moves to (pinned) CPU memory and back; on CUDA the next group's copy runs on
    a side stream while the current step computes.

    Args:
        group_element (int): units per group. Default: ``1``.
        strategy (str): ``down2up`` (embedding first), ``up2down``, or ``random`` (a new seeded
            permutation of the groups every cycle). Default: ``'down2up'``.
        freeze_layers (Sequence[int]): unit indices never trained (negative counts from the head).
            Default: ``()``.
        always_active (Sequence[int]): unit indices trained at every step, outside the cycle (LISA keeps
            embedding and head: ``[0, -1]``). Default: ``()``.
        optimizer_state (str): ``keep`` (HiFT: a group's state persists across cycles, parked on the
            CPU) or ``reset`` (BAdam: fresh state at every switch). Default: ``'keep'``.
        param_dtype (str, optional): store the weights as ``bfloat16`` or ``float16`` and keep an fp32
            master copy for the active group only, swapped in for the optimizer step. Default: ``None``.
        seed (int): seed of the ``random`` strategy. Default: ``17``.
        offload_dir (str, optional): a folder on a fast local disk where ``keep`` parks inactive groups'
            optimizer state instead of host memory, read back when the group returns: for a machine
            whose RAM cannot also hold every group's Adam moments (54 GB for a 7B model). Single
            process or DDP. Refused when it is, contains or lies inside the save folder, or when its
            ``rank<N>`` folder holds files of anything but an earlier offload. Default: ``None`` (host memory).

    Example:
        >>> trainer = Trainer(model=model, optimizers=DecoupledAdamW(model.parameters(), lr=2e-5),
        ...                   callbacks=[HiFTCallback(group_element=2, strategy="random")], ...)

    FSDP: FSDP2 (train.py's default; ``FSDP_VERSION=2`` for a Trainer of your own) shards per
    parameter, so frozen and trainable tensors sit side by side; HiFT looks its parameters up by name
    once Composer has sharded the model, and the parked optimizer state stays sharded (DTensors, keyed
    by parameter name). It is saved in Composer's ``sharded`` checkpoints and, on resume, read back
    from the checkpoint's local folder after Composer's own load (``state_dict_type: full`` is
    refused: a full optimizer checkpoint cannot be loaded back into an optimizer that holds one
    group's state). FSDP1 is refused: its flat parameters hold per-rank slices that the callback state
    could not checkpoint. ``param_dtype`` is refused under FSDP: FSDP2's own mixed precision
    (``precision: amp_bf16``) already keeps the sharded fp32 weights as the master copy and computes
    with bf16 copies.

    +---------------------+--------------------------------------------------+
    | Key                 | Logged value                                     |
    +=====================+==================================================+
    | ``hift/active_group`` | index of the group trained at this step        |
    | ``hift/cycle``      | completed cycles before this step                |
    | ``hift/lr``         | learning rate of the first param group this step |
    +---------------------+--------------------------------------------------+
    """

    def __init__(
        self,
        group_element: int = 1,
        strategy: str = "down2up",
        freeze_layers: Sequence[int] = (),
        always_active: Sequence[int] = (),
        optimizer_state: str = "keep",
        param_dtype: Optional[str] = None,
        seed: int = 17,
        offload_dir: Optional[str] = None,
    ) -> None:
        if not isinstance(group_element, int) or group_element < 1:
            raise ValueError(f"group_element: must be a positive int, got {group_element!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: {strategy!r} is not one of {STRATEGIES}")
        if optimizer_state not in STATE_MODES:
            raise ValueError(f"optimizer_state: {optimizer_state!r} is not one of {STATE_MODES}")
        if param_dtype is not None and param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype: {param_dtype!r} is not one of {sorted(PARAM_DTYPES)} (or null)")
        self.group_element, self.strategy, self.seed = group_element, strategy, seed
        self.freeze_layers, self.always_active = list(freeze_layers), list(always_active)
        self.optimizer_state, self.param_dtype = optimizer_state, param_dtype
        self.offload_dir = None if offload_dir is None else Path(offload_dir)
        self.units: list[tuple[str, list[str]]] = []  # (unit name, parameter names), bottom to top
        self.groups: list[list[int]] = []  # unit indices of each group, bottom to top
        self._model: Optional[nn.Module] = None
        self._params: dict[str, nn.Parameter] = {}  # by name; rebound once FSDP has replaced them
        self._cycled: set[str] = set()  # every unit parameter not in freeze_layers
        self._always: list[int] = []
        self._active: Optional[set[str]] = None  # parameter names trained now
        self._parked: dict[str, dict[str, Any] | Path] = {}  # inactive parameters' state: on the CPU, or its file
        self._loaded_keys: list[list[str]] = []  # [name, key] of every state tensor the checkpoint holds
        self._prefetched: dict[str, dict[str, Any]] = {}  # next group's state, already on its way back
        self._master: dict[str, torch.Tensor] = {}  # fp32 weights of the active group (param_dtype)
        self._swapped = False
        self._stream: Optional[torch.cuda.Stream] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None

    @staticmethod
    def find_units(model: nn.Module) -> list[tuple[str, list[str]]]:
        """The model's units, bottom to top, as (unit name, names of its trainable parameters)."""
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks; HiFT cannot find its layers")
        blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
        unit_of = {id(p): f"block.{i}" for i, block in enumerate(blocks) for p in block.parameters()}
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        vocab = embeddings[0].num_embeddings if embeddings else -1
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if id(p) in unit_of:
                    continue
                if isinstance(module, nn.Embedding):
                    unit_of[id(p)] = "embedding"
                elif isinstance(module, nn.Linear) and module.out_features == vocab:
                    unit_of[id(p)] = "head"
        order = ["embedding", *(f"block.{i}" for i in range(len(blocks))), "norm", "head"]
        members: dict[str, list[str]] = {name: [] for name in order}
        for name, p in model.named_parameters():  # a tied head appears once, under the embedding
            if p.requires_grad:
                members[unit_of.get(id(p), "norm")].append(name)
        return [(name, members[name]) for name in order if members[name]]

    # --- schedule -------------------------------------------------------------------------------
    def order(self, cycle: int) -> list[int]:
        """Group indices in the order cycle ``cycle`` visits them."""
        n = len(self.groups)
        if self.strategy == "down2up":
            return list(range(n))
        if self.strategy == "up2down":
            return list(range(n - 1, -1, -1))
        generator = torch.Generator().manual_seed(self.seed + cycle)  # a pure function of the cycle
        return torch.randperm(n, generator=generator).tolist()

    def group_at(self, step: int) -> int:
        cycle, position = divmod(step, len(self.groups))
        return self.order(cycle)[position]

    def units_trained_with(self, group: int) -> list[int]:
        """Unit indices trained while ``group`` is active: the group and ``always_active`` (after INIT)."""
        return self.groups[group] + self._always

    def _names(self, group: int) -> set[str]:
        return {name for u in self.units_trained_with(group) for name in self.units[u][1]}

    def _indices(self, key: str, values: Sequence[int]) -> list[int]:
        n = len(self.units)
        bad = [v for v in values if not -n <= v < n]
        if bad:
            raise ValueError(f"{key}: unit indices {bad} are out of range for {n} units {[u for u, _ in self.units]}")
        return sorted({v % n for v in values})

    def plan(self, units: list[tuple[str, list[str]]]) -> tuple[list[int], list[int], list[list[int]]]:
        """(frozen, always-active, groups) unit indices for these units, or a ValueError naming the key.

        Public so that train.py can check a yaml against its model's units before anything heavy
        starts. A ``group_element`` above the number of cycled units asks for groups that cannot exist
        (it would silently become full fine-tuning), so it is refused rather than run."""
        self.units = units
        frozen = self._indices("freeze_layers", self.freeze_layers)
        always = self._indices("always_active", self.always_active)
        if set(frozen) & set(always):
            raise ValueError(f"freeze_layers and always_active: both name units {sorted(set(frozen) & set(always))}")
        cycled = [u for u in range(len(units)) if u not in frozen and u not in always]
        if not cycled:
            raise ValueError(f"freeze_layers/always_active: leave no unit to cycle over among the {len(units)} units "
                             f"{[u for u, _ in units]}; free at least one")
        if self.group_element > len(cycled):
            raise ValueError(f"group_element: {self.group_element} is larger than the {len(cycled)} cycled units, "
                             f"which would train them all at once (full fine-tuning); use at most {len(cycled)}")
        groups = [cycled[i : i + self.group_element] for i in range(0, len(cycled), self.group_element)]
        return frozen, always, groups

    # --- events ---------------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if state.fsdp_config is not None:
            self._check_fsdp(state.fsdp_config)  # no _FindUnusedParameters: only DDP reads it
        elif not any(isinstance(a, _FindUnusedParameters) for a in state.algorithms):
            state.algorithms.append(_FindUnusedParameters())  # read by the Trainer after INIT, before DDP
        self._model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
        if self.offload_dir is not None:
            # The run's checkpoints are its input here; the rank folder is HiFT's own or new, never a stranger's.
            saves = [format_name_with_dist(c.folder, state.run_name) for c in state.callbacks
                     if isinstance(c, CheckpointSaver) and "://" not in c.folder]
            check_inputs(self.offload_dir, saves)
            self.offload_dir = claim_directory(self.offload_dir / f"rank{dist.get_global_rank()}", OFFLOAD_COMMAND)
        self.units = self.find_units(self._model)
        self._bind()
        frozen, self._always, self.groups = self.plan(self.units)
        self._cycled = {name for u, (_, names) in enumerate(self.units) if u not in frozen for name in names}
        for u in frozen:
            for name in self.units[u][1]:
                self._params[name].requires_grad_(False)
        if self.param_dtype is not None:
            for _, names in self.units:
                for name in names:
                    self._params[name].data = self._params[name].data.to(PARAM_DTYPES[self.param_dtype])

    def _check_fsdp(self, config: FSDPConfig | FSDP2Config) -> None:
        if isinstance(config, FSDPConfig):
            raise ValueError("fsdp_config: HiFT needs FSDP2 (train.py's default: unset FSDP_VERSION=1; with a Trainer "
                             "of your own, set FSDP_VERSION=2); FSDP1's "
                             "flat parameters keep per-rank slices that HiFT cannot park and checkpoint by name")
        if self.param_dtype is not None:
            raise ValueError("callbacks.hift.param_dtype: not supported under FSDP; drop it and set precision: "
                             "amp_bf16: FSDP2's mixed precision keeps the sharded fp32 weights as the master copy "
                             "and computes with bf16 copies")
        if self.offload_dir is not None:
            raise ValueError("callbacks.hift.offload_dir: not supported under FSDP, where each rank parks only its "
                             "shards (1/world size of the state) in host memory; drop it")
        if config.state_dict_type != "sharded":
            raise ValueError(f"fsdp_config.state_dict_type: HiFT under FSDP needs 'sharded', got "
                             f"{config.state_dict_type!r}: torch cannot load a full optimizer checkpoint into an "
                             "optimizer holding one group's state, so the run could not resume (converters read "
                             "sharded folders; start from a monolithic checkpoint with model.pretrained)")

    def before_load(self, state: State, logger: Logger) -> None:
        del state, logger  # unused
        self._bind()  # Composer has sharded the model (FSDP2 swaps in DTensor parameters) after INIT
        # Loading an optimizer checkpoint first takes a zero-gradient step over every parameter that
        # requires grad (torch's _init_optim_state): full-model state, the memory HiFT exists to avoid.
        self._set_trainable(set())

    def after_load(self, state: State, logger: Logger) -> None:
        del logger  # unused
        unread = [[n, k] for n, k in self._loaded_keys if k not in self._parked.get(n, {})]
        if unread:
            self._read_sharded(state.load_path, unread)
        # DDP, built next, registers gradient hooks only for parameters that require grad now.
        self._set_trainable(self._cycled)

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if len(state.optimizers) != 1:
            raise ValueError(f"optimizers: HiFT drives one optimizer, got {len(state.optimizers)}")
        in_optimizer = {id(p) for g in state.optimizers[0].param_groups for p in g["params"]}
        missing = sorted(n for n in self._cycled if id(self._params[n]) not in in_optimizer)
        if missing:
            raise ValueError(f"optimizer: HiFT needs every trainable parameter in it; missing {missing[:3]}...")
        if any(not isinstance(s, LambdaLR) for s in state.schedulers):
            raise ValueError("schedulers: HiFT holds the rate per cycle for Composer schedulers only")
        self._optimizer = state.optimizers[0]
        if state.device.name == "gpu":
            self._stream = torch.cuda.Stream()
        # what a checkpoint brought back arrived on the parameters' device
        self._parked = {name: self._park(name, s) for name, s in self._parked.items()}
        self._active = None  # whatever holds optimizer state now is parked, the step's group restored
        self._switch(state, int(state.timestamp.batch))
        if self.optimizer_state == "reset":
            self._parked.clear()  # a checkpoint's state for other groups: they start afresh when next active

    def batch_start(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        self._switch(state, step)
        self._hold_lr(state, step)
        self._prefetch(state, self._names(self.group_at(step + 1)) - self._active)
        logger.log_metrics({
            "hift/active_group": self.group_at(step),
            "hift/cycle": step // len(self.groups),
            "hift/lr": state.optimizers[0].param_groups[0]["lr"],
        })

    def after_train_batch(self, state: State, logger: Logger) -> None:
        del state, logger  # unused
        if self.param_dtype is None:
            return
        # Gradients are ready, the update is next: it runs on the fp32 master with an fp32 gradient.
        for name, master in self._master.items():
            p = self._params[name]
            if p.grad is not None:
                grad = p.grad.to(master.dtype)
                p.data = master
                p.grad = grad
        self._swapped = True

    def batch_end(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if self._swapped:
            for name, master in self._master.items():
                self._params[name].data = master.to(PARAM_DTYPES[self.param_dtype])
            self._swapped = False
        self._hold_lr(state, int(state.timestamp.batch))  # so that LRMonitor logs the rate of the next step

    # --- moving optimizer state -------------------------------------------------------------------
    def _bind(self) -> None:
        self._params = dict(self._model.named_parameters())

    def _reshard(self) -> None:
        """FSDP2 copies ``requires_grad`` to an unsharded parameter only when it all-gathers it, and its
        root module keeps the gathered parameters after a forward without backward (an evaluation):
        freed here, they are gathered again by the next forward, with the new group's flags."""
        for module in self._model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _set_trainable(self, names: set[str]) -> None:
        for _, unit in self.units:
            for name in unit:
                self._params[name].requires_grad_(name in names)

    def _switch(self, state: State, step: int) -> None:
        new = self._names(self.group_at(step))
        if new == self._active:
            return
        optimizer = state.optimizers[0]
        old = self._active if self._active is not None else self._cycled
        moving = self._stream is not None
        if moving:
            self._stream.wait_stream(torch.cuda.current_stream())  # the last update must be complete
        for name in sorted(old - new):
            p = self._params[name]
            p.requires_grad_(False)
            p.grad = None
            self._master.pop(name, None)
            parked = optimizer.state.pop(p, None)
            if parked and self.optimizer_state == "keep":
                self._parked[name] = self._park(name, parked)
        for name in sorted(new - (self._active or set())):
            p = self._params[name]
            p.requires_grad_(True)
            restored = self._prefetched.pop(name, None) or self._to_device(self._unpark(name), p)
            self._parked.pop(name, None)
            if restored:
                optimizer.state[p] = restored
            if self.param_dtype is not None and name not in self._master:
                self._master[name] = p.data.float()
        if moving:
            torch.cuda.current_stream().wait_stream(self._stream)
        self._active = new
        self._reshard()

    def _park(self, name: str, tensors: dict[str, Any]) -> dict[str, Any] | Path:
        """Where an inactive parameter's state waits: host memory, or a file in ``offload_dir``."""
        tensors = self._to_host(tensors, self._params[name])
        if self.offload_dir is None:
            return tensors
        path = self.offload_dir / f"{name}.pt"
        try:  # scratch space, rewritten at each park: no need for atomic writes
            with path.open("wb") as f:  # a Python file: a full disk surfaces as ENOSPC, not "write failed"
                torch.save(tensors, f)
        except (OSError, RuntimeError) as err:
            if is_no_space(err):
                needs = sum(t.numel() * t.element_size() for t in tensors.values() if torch.is_tensor(t))
                raise NoSpaceError(self.offload_dir, needs) from None
            raise
        return path

    def _unpark(self, name: str) -> Optional[dict[str, Any]]:
        parked = self._parked.get(name)
        if isinstance(parked, Path):
            return torch.load(parked, map_location="cpu", weights_only=True)
        return parked

    def _prefetch(self, state: State, names: set[str]) -> None:
        if self._stream is None:
            return  # on the CPU "parked" and "active" state share one memory: nothing to overlap
        for name in sorted(names):
            if name in self._parked and name not in self._prefetched:
                self._prefetched[name] = self._to_device(self._unpark(name), self._params[name])

    def _to_host(self, tensors: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """Parameter-shaped state (Adam's moments) moves; scalars such as ``step`` stay where they are.
        A DTensor moves its local shard and stays a DTensor."""
        if self._stream is None or p.device.type != "cuda":
            return tensors
        host = {}
        with torch.cuda.stream(self._stream):
            for key, value in tensors.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.is_cuda:
                    moved = value.to("cpu", non_blocking=True)  # non-blocking to the host: pinned memory
                    _local(value).record_stream(self._stream)  # freed only once the copy has run
                    value = moved
                host[key] = value
        return host

    def _to_device(self, tensors: Optional[dict[str, Any]], p: torch.Tensor) -> Optional[dict[str, Any]]:
        if not tensors or self._stream is None or p.device.type != "cuda":
            return tensors
        restored = {}
        with torch.cuda.stream(self._stream):
            for key, value in tensors.items():
                if torch.is_tensor(value) and value.shape == p.shape and not value.is_cuda:
                    value = value.to(p.device, non_blocking=True)
                    _local(value).record_stream(torch.cuda.current_stream(p.device))
                restored[key] = value
        return restored

    def _hold_lr(self, state: State, step: int) -> None:
        start = (step // len(self.groups)) * len(self.groups)  # the cycle's first step
        now = state.timestamp
        batches = max(int(now.batch), 1)
        # Composer's schedulers read state.timestamp; show them the cycle's first batch for a moment.
        state.timestamp = now.copy(
            batch=start, sample=int(now.sample) * start // batches, token=int(now.token) * start // batches
        )
        try:
            for scheduler in state.schedulers:
                factors = [fn(start) for fn in scheduler.lr_lambdas]
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, factors):
                    group["lr"] = base * factor
        finally:
            state.timestamp = now

    # --- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The active group's state too: Composer's optimizer checkpoint skips parameters that do not
        # require grad when it loads, and before_load turns them all off.
        active = {}
        if self._optimizer is not None:
            names = {id(p): n for n, p in self._params.items()}
            active = {names[id(p)]: dict(s) for p, s in self._optimizer.state.items() if id(p) in names}
        optimizer_state = {**{name: dict(self._unpark(name)) for name in self._parked}, **active}
        return {
            "units": [name for name, _ in self.units],
            "groups": self.groups,
            "strategy": self.strategy,
            "seed": self.seed,
            "optimizer_state": optimizer_state,
            # Composer loads a sharded checkpoint into the tensors of this very dict as a fresh run builds
            # it, which holds none yet; this list (one entry, read whole) says what after_load must read.
            "optimizer_state_keys": sorted([name, key] for name, s in optimizer_state.items() for key in s),
            "master": {name: m.detach().cpu() for name, m in self._master.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        here = {"units": [name for name, _ in self.units], "groups": self.groups, "strategy": self.strategy,
                "seed": self.seed}
        for key, value in here.items():
            if state[key] != value:
                raise ValueError(f"callbacks.hift.{key}: the checkpoint has {state[key]!r}, this run {value!r}")
        self._parked = {name: dict(s) for name, s in state["optimizer_state"].items()}
        self._loaded_keys = state.get("optimizer_state_keys", [])  # absent from checkpoints older than it
        self._master = {name: m.to(self._params[name].device) for name, m in state["master"].items()}

    def _read_sharded(self, folder: Optional[str], keys: list[list[str]]) -> None:
        """Reads the parked optimizer state of a sharded (torch distributed) checkpoint into tensors laid
        out like this run's parameters: DTensors sharded as they are, whatever the saving world size."""
        if folder is None or not (Path(folder) / ".metadata").is_file():
            raise ValueError(f"load_path: HiFT reads its parked optimizer state from the sharded checkpoint's local "
                             f"folder, and {folder!r} is none; download the checkpoint and load it from disk")
        reader = dcp.FileSystemReader(folder)
        saved = reader.read_metadata().state_dict_metadata
        prefix = f"state.callbacks.{type(self).__qualname__}.optimizer_state"
        template: dict[str, dict[str, Any]] = {}
        for name, key in keys:
            meta, p = saved[f"{prefix}.{name}.{key}"], self._params[name]
            if isinstance(meta, BytesStorageMetadata):
                value = None  # a plain object: DCP replaces it
            elif isinstance(p, DTensor) and tuple(meta.size) == tuple(p.shape):
                value = torch.empty_like(p, dtype=meta.properties.dtype)  # sharded like its parameter
            else:
                value = torch.empty(meta.size, dtype=meta.properties.dtype)
            template.setdefault(name, {})[key] = value
        dcp.load({"state": {"callbacks": {type(self).__qualname__: {"optimizer_state": template}}}},
                 storage_reader=reader)
        for name, tensors in template.items():
            self._parked.setdefault(name, {}).update(tensors)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
