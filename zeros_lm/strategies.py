"""Lightning's DeepSpeed strategy, made to run on CPU as well as on CUDA GPUs.

Stock Lightning refuses DeepSpeed unless the accelerator is CUDA. On a CPU (DeepSpeed's ``cpu``
accelerator, gloo for the collectives) ZeRO stages 2 and 3 work with three changes, applied here
only when the strategy's device is not a CUDA device:

1. ``setup_environment`` skips the CUDA check;
2. ``setup_distributed`` skips the device-index validation (CPU devices have no index);
3. ``deepspeed.initialize`` gets ``device_rank=local_rank`` instead of the CUDA device index.

On CPU it also leaves out DeepSpeed's shared-memory collectives op. DeepSpeed compiles it on every
first start (about 30 s, and a C++ compiler), but engages it only when ``LOCAL_SIZE`` (set by the
``deepspeed`` launcher, never by Lightning) names all the ranks; under Lightning it would be built
and never used. ZeRO stages 1-3 on CPU then compile nothing; CPU offload still compiles CPU Adam.

DeepSpeed's ops compile on first use through torch, which holds a ``lock`` file in the op's build
directory meanwhile and makes every other process wait, with no time limit, for that file to go.
A build that was killed midway leaves the file behind, and every later run would hang at
"initializing deepspeed distributed". Before DeepSpeed starts, :func:`check_build_locks` turns a
lock that no process holds open (whatever its age) into one error that names the file, and warns
of one that a build running now holds.

Checkpoints are also written atomically: DeepSpeed writes its shards into a temporary directory
beside the checkpoint (``zeros_lm.atomic.temporary_sibling``) that is moved into place once every
rank has finished, so an interrupted save never leaves a half-written checkpoint under a name that
``--ckpt_path`` could pick up.

Importing this module registers the subclass under all of Lightning's DeepSpeed strategy names
(``deepspeed``, ``deepspeed_stage_2``, ``deepspeed_stage_3_offload``, ...), so
``--trainer.strategy deepspeed_stage_3`` works on either kind of machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator when first imported; without this it probes for CUDA and
    # prints about it. Users with GPUs keep whatever they set.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry  # noqa: E402
from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy as _LightningDeepSpeedStrategy  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402

from zeros_lm._locks import processes_holding  # noqa: E402
from zeros_lm.atomic import move_into_place, remove_path, temporary_sibling  # noqa: E402
from zeros_lm.rundir import RunError  # noqa: E402

__all__ = ["DeepSpeedStrategy", "uses_deepspeed", "deepspeed_offloads_optimizer", "register", "check_build_locks"]

# Where it cannot be told whether a process holds a build lock (no /proc): the longest a build of
# one of DeepSpeed's ops can take (CPU Adam, the largest built on CPU, takes about a minute on two
# cores); a build lock older than this was left by a build that was killed.
STALE_BUILD_LOCK_SECONDS = 600
BUILD_LOCK_RELEASE_SECONDS = 0.5  # torch's builder closes the lock file, then deletes it: look again after this
SHARED_MEMORY_COMM_OP = "deepspeed_shm_comm"  # the op that DeepSpeedStrategy leaves out on CPU


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """``lightning.pytorch.strategies.DeepSpeedStrategy`` that also runs on CPU.

    Takes exactly the arguments of Lightning's strategy (``stage``, ``offload_optimizer``,
    ``offload_parameters``, ``config``, ...).
    """

    strategy_name = "deepspeed"

    # -- the CPU overrides ---------------------------------------------------------------------
    def _on_cpu(self) -> bool:
        return self.root_device.type != "cuda"

    def _skips_shared_memory_comm_op(self) -> bool:
        return self._on_cpu() and "LOCAL_SIZE" not in os.environ

    def setup_environment(self) -> None:
        check_build_locks(ignore=(SHARED_MEMORY_COMM_OP,) if self._skips_shared_memory_comm_op() else ())
        if self._on_cpu():
            # Skip the "only supported on CUDA GPUs" check; the DDP parent sets up the process
            # group through our setup_distributed below.
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _init_deepspeed_distributed(self) -> None:
        if self._skips_shared_memory_comm_op():
            with _without_shared_memory_comm_op():
                super()._init_deepspeed_distributed()
        else:
            super()._init_deepspeed_distributed()

    def _device_rank(self) -> int:
        index = self.root_device.index
        return self.local_rank if index is None else index

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=self.config,
            model=model,
            model_parameters=trainable,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model) -> None:
        if not self._on_cpu():
            super()._initialize_deepspeed_inference(model)
            return
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )
        self.model = engine

    # -- atomic checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        # Every rank writes its shards into one temporary directory (named by rank 0; a killed
        # save's is removed when the next run starts), which rank 0 then moves into place.
        final = Path(self.broadcast(str(filepath)))
        partial = Path(self.broadcast(str(temporary_sibling(final))))
        self.barrier("zeros_lm_ckpt_pre")
        super().save_checkpoint(checkpoint, str(partial), storage_options=storage_options)
        self.barrier("zeros_lm_ckpt_written")
        if self.is_global_zero:
            move_into_place(partial, final)
        self.barrier("zeros_lm_ckpt_renamed")

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            remove_path(filepath)


@contextlib.contextmanager
def _without_shared_memory_comm_op() -> Iterator[None]:
    """DeepSpeed's communication backend, created meanwhile, skips building its shared-memory op
    (which it would leave uninitialised and unused without ``LOCAL_SIZE``; it then uses gloo alone)."""
    import importlib

    # (not ``import deepspeed.comm.torch as ...``: the package's attribute ``torch`` is torch itself)
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    build = getattr(ds_comm, "build_shm_op", None)
    if build is None:  # another DeepSpeed version: leave it as it is
        yield
        return
    ds_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_comm.build_shm_op = build


def extension_build_root() -> Path:
    """Where torch builds C++ extensions on first use (DeepSpeed's ops among them):
    ``TORCH_EXTENSIONS_DIR``, else torch's per-user cache folder."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def deepspeed_build_locks(root: Optional[Path] = None) -> list[Path]:
    """The build locks of DeepSpeed's ops under ``root`` (``<root>/<op>/lock``; without
    ``TORCH_EXTENSIONS_DIR`` torch adds a ``py<version>_<device>`` level)."""
    import deepspeed.ops

    root = extension_build_root() if root is None else Path(root)
    names = set(getattr(deepspeed.ops, "__compatible_ops__", {}))
    return sorted(lock for pattern in ("*/lock", "*/*/lock") for lock in root.glob(pattern) if lock.parent.name in names)


def _age(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _build_running(lock: Path, age: float) -> Optional[list[int]]:
    """The processes building the op of ``lock`` (torch's builder holds the lock file open until it
    deletes it), or None if none is: a killed build left it. Where ``/proc`` cannot tell, a lock
    younger than ``STALE_BUILD_LOCK_SECONDS`` counts as a build running (by an unknown process)."""
    holders = processes_holding(lock)
    if holders is None:
        return [] if age <= STALE_BUILD_LOCK_SECONDS else None
    if not holders:
        time.sleep(BUILD_LOCK_RELEASE_SECONDS)  # a build that just finished closes the file, then deletes it
        if not lock.exists():
            return []
        holders = processes_holding(lock) or None
    return holders


def check_build_locks(root: Optional[Path] = None, ignore: tuple[str, ...] = (), now: Optional[float] = None) -> None:
    """Raise :class:`RunError` for a build lock of a DeepSpeed op (other than those in ``ignore``)
    that no process holds, whatever its age: a killed build left it, and torch would wait for it
    forever. Warn of one held by a build running now, which a run needing the op waits for."""
    now = time.time() if now is None else now
    for lock in deepspeed_build_locks(root):
        if lock.parent.name in ignore:
            continue
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # the build finished meanwhile
            continue
        op = lock.parent.name
        builders = _build_running(lock, age)
        if builders is None:
            raise RunError(
                f"{lock} is left from a build of DeepSpeed's {op} op that started {_age(age)} ago and was "
                f"interrupted (no process on this machine has it open); DeepSpeed would wait for it forever. "
                f"Make sure no other run is compiling {op}, delete {lock}, and start again"
            )
        if not lock.exists():
            continue
        who = f", held by process {builders[0]}" if builders else ""
        print(
            f"warning: another process is building DeepSpeed's {op} op ({lock}{who}, for {_age(age)} now); a run "
            f"that needs the op waits until it is built. If no build is running, stop this run and delete that file.",
            file=sys.stderr,
            flush=True,
        )


_NAMES = {
    "deepspeed": dict(description="DeepSpeed (CPU or CUDA)"),
    "deepspeed_stage_1": dict(description="DeepSpeed ZeRO stage 1 (CPU or CUDA)", stage=1),
    "deepspeed_stage_2": dict(description="DeepSpeed ZeRO stage 2 (CPU or CUDA)", stage=2),
    "deepspeed_stage_2_offload": dict(
        description="DeepSpeed ZeRO stage 2, optimizer offloaded to CPU", stage=2, offload_optimizer=True
    ),
    "deepspeed_stage_3": dict(description="DeepSpeed ZeRO stage 3 (CPU or CUDA)", stage=3),
    "deepspeed_stage_3_offload": dict(
        description="DeepSpeed ZeRO stage 3, optimizer and parameters offloaded to CPU",
        stage=3,
        offload_optimizer=True,
        offload_parameters=True,
    ),
    "deepspeed_stage_3_offload_nvme": dict(
        description="DeepSpeed ZeRO stage 3, offloaded to NVMe",
        stage=3,
        offload_optimizer=True,
        offload_parameters=True,
        remote_device="nvme",
        offload_params_device="nvme",
        offload_optimizer_device="nvme",
    ),
}


def register(registry=StrategyRegistry) -> None:
    """(Re-)register the DeepSpeed strategy names to :class:`DeepSpeedStrategy`."""
    for name, kwargs in _NAMES.items():
        kwargs = dict(kwargs)
        description = kwargs.pop("description")
        registry.register(name, DeepSpeedStrategy, description=description, override=True, **kwargs)


register()


def uses_deepspeed(strategy) -> bool:
    return isinstance(strategy, _LightningDeepSpeedStrategy)


def deepspeed_offloads_optimizer(strategy) -> bool:
    """Whether a DeepSpeed strategy offloads the optimizer (which then needs DeepSpeedCPUAdam)."""
    if not uses_deepspeed(strategy):
        return False
    config = strategy.config
    if config is None:
        strategy._init_config_if_needed()
        config = strategy.config
    zero = (config or {}).get("zero_optimization", {}) or {}
    offload = zero.get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")

