"""HiFT: hierarchical full-parameter fine-tuning, one group of layers trained per optimizer step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from composer import Callback, State
from composer.callbacks import CheckpointSaver
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.file_helpers import format_name_with_dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.optim.lr_scheduler import LambdaLR

from llmhift.atomic import check_inputs, claim_directory
from llmhift.callbacks.hift.ddp import DDPFindUnusedParameters
from llmhift.callbacks.hift.parking import Parked, park, read_sharded, to_device, unpark
from llmhift.callbacks.hift.schedule import (
    STRATEGIES,
    Plan,
    Unit,
    cycle_of,
    cycle_order,
    find_units,
    group_at,
    plan_groups,
)
from llmhift.models.causal_lm import unwrap_model

__all__ = ["HiFTCallback", "ACTIVE_GROUP_KEY", "PARAM_DTYPES"]

STATE_MODES = ("keep", "reset")
PARAM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLOAD_COMMAND = "HiFTCallback.offload_dir"  # the marker of a rank's offload folder
ACTIVE_GROUP_KEY = "hift/active_group"  # logged every step; the report plots it
PARKED_FIELD = "optimizer_state"  # the state_dict() field that holds every group's optimizer state


class HiFTCallback(Callback):
    """Trains one group of units per optimizer step, cycling over the model; only the active group's
    optimizer state (and fp32 master weights) sits on the accelerator.

    Units are found from the module structure (:func:`~llmhift.callbacks.hift.schedule.find_units`): the
    input embedding, each block, the final norm, the LM head; only parameters that require grad when the
    Trainer is built count (a ``peft`` model cycles over its adapters). Consecutive units form groups of
    ``group_element``; a cycle visits each of the C groups once, for ``switch_every`` (K) consecutive
    optimizer steps each (C x K steps), switching at ``BATCH_START`` so that every micro-batch of a step
    trains the same group. Every step of cycle k uses the learning rate the Trainer's schedule gives at
    batch ``k * C * K``, the cycle's first: the schedule keeps meaning ``max_duration`` (not stretched
    C x K times). Inactive groups' optimizer state moves to (pinned) CPU memory and back; on CUDA
    the next group's copy runs on a side stream while the current step computes.

    Args:
        group_element (int): units per group. Default: ``1``.
        switch_every (int): optimizer steps each group trains before the next one takes over: ``1`` is
            HiFT; with ``optimizer_state='reset'`` and ``50`` it is BAdam's block schedule. Default: ``1``.
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
        >>> trainer = Trainer(model=model, optimizers=torch.optim.AdamW(model.parameters(), lr=2e-5),
        ...                   callbacks=[HiFTCallback(group_element=2, strategy="random")],
        ...                   algorithms=[DDPFindUnusedParameters()], ...)  # doctest: +SKIP

    The Trainer must hold one optimizer with every trainable parameter, and Composer schedulers; under
    DDP (several ranks, no FSDP) it needs :class:`~llmhift.callbacks.hift.DDPFindUnusedParameters` in
    ``algorithms=`` (train.py adds it): the callback refuses, in one line, a Trainer without these.

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

    +-----------------------+--------------------------------------------------+
    | Key                   | Logged value                                     |
    +=======================+==================================================+
    | ``hift/active_group`` | index of the group trained at this step          |
    | ``hift/cycle``        | completed cycles before this step                |
    | ``hift/lr``           | learning rate of the first param group this step |
    +-----------------------+--------------------------------------------------+
    """

    def __init__(
        self,
        group_element: int = 1,
        switch_every: int = 1,
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
        if not isinstance(switch_every, int) or isinstance(switch_every, bool) or switch_every < 1:
            raise ValueError(f"switch_every: must be a positive int (optimizer steps per group), got {switch_every!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: {strategy!r} is not one of {STRATEGIES}")
        if optimizer_state not in STATE_MODES:
            raise ValueError(f"optimizer_state: {optimizer_state!r} is not one of {STATE_MODES}")
        if param_dtype is not None and param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype: {param_dtype!r} is not one of {sorted(PARAM_DTYPES)} (or null)")
        self.group_element, self.strategy, self.seed = group_element, strategy, seed
        self.switch_every = switch_every
        self.freeze_layers, self.always_active = list(freeze_layers), list(always_active)
        self.optimizer_state, self.param_dtype = optimizer_state, param_dtype
        self.offload_dir = None if offload_dir is None else Path(offload_dir)
        self.units: list[Unit] = []  # bottom to top
        self._plan = Plan([], [], [])  # unit indices: frozen, always active, each group's
        self._model: Optional[nn.Module] = None
        self._params: dict[str, nn.Parameter] = {}  # by name; rebound once FSDP has replaced them
        self._cycled: set[str] = set()  # every unit parameter not in freeze_layers
        self._active: Optional[set[str]] = None  # parameter names trained now
        self._parked: dict[str, Parked] = {}  # inactive parameters' optimizer state
        self._loaded_keys: list[list[str]] = []  # [name, key] of every state tensor the checkpoint holds
        self._prefetched: dict[str, dict[str, Any]] = {}  # next group's state, already on its way back
        self._master: dict[str, torch.Tensor] = {}  # fp32 weights of the active group (param_dtype)
        self._swapped = False
        self._stream: Optional[torch.cuda.Stream] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None

    # --- schedule (llmhift.callbacks.hift.schedule, with this callback's settings) -----------------
    def plan(self, units: list[Unit]) -> Plan:
        """(frozen, always-active, groups) unit indices for these units, or a ValueError naming the key:
        train.py checks a yaml against its model's units with it before anything heavy starts."""
        return plan_groups(units, self.group_element, self.freeze_layers, self.always_active)

    def order(self, cycle: int) -> list[int]:
        """Group indices in the order cycle ``cycle`` visits them."""
        return cycle_order(len(self.groups), self.strategy, self.seed, cycle)

    @property
    def groups(self) -> list[list[int]]:
        """Unit indices of each cycled group, bottom to top (after INIT)."""
        return self._plan.groups

    def group_at(self, step: int) -> int:
        return group_at(step, len(self.groups), self.strategy, self.seed, self.switch_every)

    def cycle_of(self, step: int) -> int:
        """The cycle optimizer step ``step`` belongs to (C groups x ``switch_every`` steps each)."""
        return cycle_of(step, len(self.groups), self.switch_every)

    def units_trained_with(self, group: int) -> list[int]:
        """Unit indices trained while ``group`` is active: the group and ``always_active`` (after INIT)."""
        return self._plan.trained_with(group)

    def _names(self, group: int) -> set[str]:
        return {name for u in self.units_trained_with(group) for name in self.units[u][1]}

    # --- events ---------------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if state.fsdp_config is not None:
            self._check_fsdp(state.fsdp_config)
        elif dist.get_world_size() > 1 and not any(isinstance(a, DDPFindUnusedParameters) for a in state.algorithms):
            raise ValueError("algorithms: HiFT under DDP needs Trainer(algorithms=[DDPFindUnusedParameters()]) "
                             "(from llmhift.callbacks): inactive groups get no gradient, which Composer's DDP "
                             "looks for only when an Algorithm asks")
        self._model = unwrap_model(state.model)
        if self.offload_dir is not None:
            # The run's checkpoints are its input here; the rank folder is HiFT's own or new, never a stranger's.
            saves = [format_name_with_dist(c.folder, state.run_name) for c in state.callbacks
                     if isinstance(c, CheckpointSaver) and "://" not in c.folder]
            check_inputs(self.offload_dir, saves)
            self.offload_dir = claim_directory(self.offload_dir / f"rank{dist.get_global_rank()}", OFFLOAD_COMMAND)
        self.units = find_units(self._model)
        self._bind()
        self._plan = self.plan(self.units)
        self._cycled = {name for u, (_, names) in enumerate(self.units) if u not in self._plan.frozen
                        for name in names}
        for u in self._plan.frozen:
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
            for name, tensors in read_sharded(state.load_path, type(self).__qualname__, PARKED_FIELD, unread,
                                              self._params).items():
                self._parked.setdefault(name, {}).update(tensors)
        # DDP, built next, registers gradient hooks only for parameters that require grad now.
        self._set_trainable(self._cycled)

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if len(state.optimizers) != 1:
            raise ValueError(f"optimizers: HiFT drives one optimizer, got {len(state.optimizers)}; pass one "
                             "optimizer over all the model's parameters")
        in_optimizer = {id(p) for g in state.optimizers[0].param_groups for p in g["params"]}
        missing = sorted(n for n in self._cycled if id(self._params[n]) not in in_optimizer)
        if missing:
            raise ValueError(f"optimizer: HiFT needs every trainable parameter in it, {len(missing)} are missing "
                             f"({missing[0]}, ...); build it from model.parameters()")
        if any(not isinstance(s, LambdaLR) for s in state.schedulers):
            raise ValueError("schedulers: HiFT holds the rate per cycle for Composer schedulers only; use one of "
                             "composer.optim's (e.g. CosineAnnealingWithWarmupScheduler), or none")
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
        self._prefetch(self._names(self.group_at(step + 1)) - self._active)
        logger.log_metrics({
            ACTIVE_GROUP_KEY: self.group_at(step),
            "hift/cycle": self.cycle_of(step),
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

    # --- switching groups -------------------------------------------------------------------------
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
            restored = self._prefetched.pop(name, None) or to_device(unpark(self._parked.get(name)), p, self._stream)
            self._parked.pop(name, None)
            if restored:
                optimizer.state[p] = restored
            if self.param_dtype is not None and name not in self._master:
                self._master[name] = p.data.float()
        if moving:
            torch.cuda.current_stream().wait_stream(self._stream)
        self._active = new
        self._reshard()

    def _park(self, name: str, tensors: dict[str, Any]) -> Parked:
        file = None if self.offload_dir is None else self.offload_dir / f"{name}.pt"
        return park(tensors, self._params[name], self._stream, file)

    def _prefetch(self, names: set[str]) -> None:
        if self._stream is None:
            return  # on the CPU "parked" and "active" state share one memory: nothing to overlap
        for name in sorted(names):
            if name in self._parked and name not in self._prefetched:
                self._prefetched[name] = to_device(unpark(self._parked[name]), self._params[name], self._stream)

    def _hold_lr(self, state: State, step: int) -> None:
        start = self.cycle_of(step) * len(self.groups) * self.switch_every  # the cycle's first step
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
        optimizer_state = {**{name: dict(unpark(parked)) for name, parked in self._parked.items()}, **active}
        return {
            "units": [name for name, _ in self.units],
            "groups": self.groups,
            "strategy": self.strategy,
            "seed": self.seed,
            "switch_every": self.switch_every,
            PARKED_FIELD: optimizer_state,
            # Composer loads a sharded checkpoint into the tensors of this very dict as a fresh run builds
            # it, which holds none yet; this list (one entry, read whole) says what after_load must read.
            "optimizer_state_keys": sorted([name, key] for name, s in optimizer_state.items() for key in s),
            "master": {name: m.detach().cpu() for name, m in self._master.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        here = {"units": [name for name, _ in self.units], "groups": self.groups, "strategy": self.strategy,
                "seed": self.seed, "switch_every": self.switch_every}
        saved = {"switch_every": 1, **state}  # checkpoints older than switch_every switched every step
        for key, value in here.items():
            if saved[key] != value:
                raise ValueError(f"callbacks.hift.{key}: the checkpoint has {saved[key]!r}, this run {value!r}")
        self._parked = {name: dict(s) for name, s in state[PARKED_FIELD].items()}
        self._loaded_keys = state.get("optimizer_state_keys", [])  # absent from checkpoints older than it
        self._master = {name: m.to(self._params[name].device) for name, m in state["master"].items()}
