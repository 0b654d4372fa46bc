"""The training data order: DistributedSampler's seeded permutation per epoch, resumable at any step, so a resumed
run sees exactly the batches the uninterrupted one would have."""

from __future__ import annotations

import torch

from mvdit.runtime.distributed import Dist
from mvdit.training import TrainError


class ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler order (seeded permutation per epoch), able to start mid-epoch at a given batch."""

    def __init__(self, n: int, d: Dist, batch: int, seed: int, start_step: int = 0):
        self.inner = torch.utils.data.DistributedSampler(
            range(n), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch, self.start_step = batch, start_step
        self.steps_per_epoch = len(self.inner) // batch
        if self.steps_per_epoch == 0:
            raise TrainError(f"dataset of {n} items is smaller than one global batch ({d.world} x {batch})")

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, offset = divmod(step, self.steps_per_epoch)
            self.inner.set_epoch(epoch)
            idx = list(self.inner)[offset * self.batch : self.steps_per_epoch * self.batch]
            yield from idx
            step = (epoch + 1) * self.steps_per_epoch

    def __len__(self):
        return 2**62


def train_loader(
    dataset, d: Dist, batch: int, seed: int, start_step: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """This rank's endless batches from step `start_step` on."""
    sampler = ResumableSampler(len(dataset), d, batch, seed=seed, start_step=start_step)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=d.device.type == "cuda",
        drop_last=True,
    )
