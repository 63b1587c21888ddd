"""From blocks to batches: the torch datasets (map-style over the cached blocks, iterable over a
stream), the sampler that resumes exactly where training stopped, and the loader Lightning
accepts as resumable."""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset, IterableDataset as TorchIterableDataset
from torch.utils.data.distributed import DistributedSampler


class BlockDataset(TorchDataset):
    """Fixed-length token blocks from an Arrow-backed ``datasets.Dataset`` (memory-mapped)."""

    def __init__(self, hf_dataset):
        self.ds = hf_dataset.with_format("numpy")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.ds[int(i)]["input_ids"], dtype=np.int64))

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        rows = np.asarray(self.ds[list(map(int, indices))]["input_ids"], dtype=np.int64)
        return list(torch.from_numpy(rows))


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch correctly: the position is not kept
    here but derived from the trainer's restored batch counters (see :class:`BlockSampler`)."""

    def state_dict(self) -> dict:
        return {"position": "from the trainer's batch counters"}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def collate_blocks(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


class BlockSampler(DistributedSampler):
    """Shuffles the blocks once per data epoch (seed + epoch), gives each rank an equal share, and
    continues exactly where training stopped.

    The position comes from ``position_fn``: the number of batches this rank has trained on so
    far (Lightning restores that count from a checkpoint). Batch ``b`` of the whole run is always
    the same data, however the run was interrupted and resumed: after a resume the first epoch is
    shortened to what was left of the interrupted one. Without ``position_fn`` it behaves like a
    plain ``DistributedSampler`` (epoch from ``set_epoch``).

    It is a ``DistributedSampler`` so that Lightning keeps it as it is in distributed runs;
    ``len()`` is always a full per-rank epoch.
    """

    def __init__(
        self,
        num_blocks: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        position_fn=None,
    ):
        super().__init__(
            range(num_blocks), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.position_fn = position_fn
        # Samples per rank and data epoch, whole batches only (the loader drops a partial batch).
        self.per_epoch = (self.num_samples // batch_size) * batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_blocks, generator=g).tolist()
        else:
            order = list(range(self.num_blocks))
        total = self.num_samples * self.num_replicas
        return order[self.rank : total : self.num_replicas]

    def position(self) -> tuple[int, int]:
        """(data epoch, samples already used in it) at the start of the next iteration."""
        if self.position_fn is None or self.per_epoch == 0:
            return self.epoch, 0
        consumed = int(self.position_fn()) * self.batch_size
        return divmod(consumed, self.per_epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.position()
        return iter(self.epoch_indices(epoch)[skip : self.per_epoch])

    def __len__(self) -> int:
        return self.num_samples


class StreamingBlocks(TorchIterableDataset):
    """Blocks from a streaming ``datasets.IterableDataset`` (already sharded for this rank).

    Like :class:`BlockSampler`, it reads where it stands from functions of the trainer's restored
    counters when it starts iterating: ``epoch_fn`` (the data epoch, which reseeds the shuffle
    buffer) and ``skip_fn`` (blocks of this epoch already trained on, after a resume). Without
    them: epoch 0, nothing skipped.
    """

    def __init__(self, hf_iterable, seed: int, shuffle_buffer: int, max_blocks: Optional[int] = None, skip_fn=None,
                 epoch_fn=None):
        self.ds = hf_iterable
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_blocks = max_blocks
        self.skip_fn = skip_fn
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Iterator[torch.Tensor]:
        ds = self.ds
        if self.shuffle_buffer and self.shuffle_buffer > 1:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(int(self.epoch_fn()) if self.epoch_fn is not None else 0)
        if self.max_blocks is not None:
            ds = ds.take(self.max_blocks)
        skip = int(self.skip_fn()) if self.skip_fn is not None else 0
        if skip:
            ds = ds.skip(skip)
        for row in ds:
            yield torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))


__all__ = ["BlockDataset", "BlockSampler", "ResumableDataLoader", "StreamingBlocks", "collate_blocks"]
