"""Lightning's DeepSpeed strategy, made to run on CPU as well as on CUDA GPUs.

Stock Lightning refuses DeepSpeed unless the accelerator is CUDA. On a CPU (DeepSpeed's ``cpu``
accelerator, gloo for the collectives) ZeRO stages 2 and 3 work with three changes, applied here
only when the strategy's device is not a CUDA device:

1. ``setup_environment`` skips the CUDA check;
2. ``setup_distributed`` skips the device-index validation (CPU devices have no index);
3. ``deepspeed.initialize`` gets ``device_rank=local_rank`` instead of the CUDA device index.

Checkpoints are also written atomically: DeepSpeed writes its shards into ``<path>.partial`` and the
directory is renamed into place once every rank has finished, so an interrupted save never leaves a
half-written checkpoint under a name that ``--ckpt_path`` could pick up.

Importing this module registers the subclass under all of Lightning's DeepSpeed strategy names
(``deepspeed``, ``deepspeed_stage_2``, ``deepspeed_stage_3_offload``, ...), so
``--trainer.strategy deepspeed_stage_3`` works on either kind of machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator when first imported; without this it probes for CUDA and
    # prints about it. Users with GPUs keep whatever they set.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry  # noqa: E402
from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy as _LightningDeepSpeedStrategy  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402

__all__ = ["DeepSpeedStrategy", "uses_deepspeed", "deepspeed_offloads_optimizer", "register"]


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """``lightning.pytorch.strategies.DeepSpeedStrategy`` that also runs on CPU.

    Takes exactly the arguments of Lightning's strategy (``stage``, ``offload_optimizer``,
    ``offload_parameters``, ``config``, ...).
    """

    strategy_name = "deepspeed"

    # -- the three CPU overrides ---------------------------------------------------------------
    def _on_cpu(self) -> bool:
        return self.root_device.type != "cuda"

    def setup_environment(self) -> None:
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
        filepath = self.broadcast(str(filepath))
        final = Path(filepath)
        partial = final.with_name(final.name + ".partial")
        if self.is_global_zero and partial.exists():
            _remove_path(partial)  # left over from a crash during an earlier save
        self.barrier("zeros_lm_ckpt_pre")
        super().save_checkpoint(checkpoint, str(partial), storage_options=storage_options)
        self.barrier("zeros_lm_ckpt_written")
        if self.is_global_zero:
            _replace_path(partial, final)
        self.barrier("zeros_lm_ckpt_renamed")

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            _remove_path(Path(filepath))


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is swapped out first and deleted after."""
    if src.is_file():
        os.replace(src, dst)
        return
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        old = dst.with_name(dst.name + ".old")
        _remove_path(old)
        os.rename(dst, old)
        os.rename(src, dst)
        _remove_path(old)
        return
    os.rename(src, dst)


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

