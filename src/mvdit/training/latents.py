"""The training latents: the tokenizer's encoding of each batch, or (train.cache_latents) each item's encoding kept in
host memory after its first use.

Caching is exact for what the loader yields: the tokenizer is deterministic and the items are not augmented, so a
step sees the latents it would have encoded. Cached items are encoded one at a time, on first use or after a resume
alike, so an interrupted run and an uninterrupted one train on the same bits.
"""

from __future__ import annotations

import logging

import torch

from mvdit.encoders.tokenizer import VideoTokenizer

log = logging.getLogger(__name__)


class TrainingLatents:
    """batch -> x0 [B, 16, V*t, h, w] in fp32 on the tokenizer's device (upstream's normalisation and sigma_data)."""

    def __init__(self, tokenizer: VideoTokenizer, n_views: int, cache: bool) -> None:
        self.tokenizer, self.n_views = tokenizer, n_views
        self.items: dict[int, torch.Tensor] | None = {} if cache else None
        self.encoded = 0  # items or batches through the encoder (the tests count them)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        self.encoded += 1
        with torch.no_grad():
            x = video.to(self.tokenizer.device).to(self.tokenizer.dtype) / 127.5 - 1  # upstream's normalisation
            return self.tokenizer.encode_views(x, self.n_views).float()

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.items is None:
            return self._encode(batch["video"])
        out = []
        for row, index in enumerate(batch["index"].tolist()):
            z = self.items.get(index)
            if z is None:
                z = self.items[index] = self._encode(batch["video"][row : row + 1]).cpu()
                if len(self.items) == 1:
                    log.info("train.cache_latents: %.1f MB per item in host memory", z.numel() * 4 / 2**20)
            out.append(z)
        return torch.cat(out).to(self.tokenizer.device, non_blocking=True)


class Indexed(torch.utils.data.Dataset):
    """A dataset whose items also carry their index (the latent cache's key)."""

    def __init__(self, inner: torch.utils.data.Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        return {**self.inner[index], "index": index}
