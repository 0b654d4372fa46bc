"""One sampling session: everything between an experiment and a decoded sample, shared by src/infer.py,
src/evaluate.py and the benchmarks, so that they sample the same way.

Set-up order, which the scripts rely on: processes (torchrun's group, or one) → dtype → checks that can fail
without loading anything (FP8 backend, SDPA kernel) → [the caller's text encoder] → tokenizer (main process only)
→ models (strict load, adapter, FP8, context parallelism, compilation) → per sample: encode the condition frames
on the main process, broadcast, sample on every process, decode on the main process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from mvdit.adapters.lora import load_model_with_adapter
from mvdit.assets.checkpoint import load_model
from mvdit.constants import SPATIAL_COMPRESSION, latent_frames
from mvdit.encoders.tokenizer import VideoTokenizer
from mvdit.inference.generate import generate, inference_dtype
from mvdit.model.network import DiffusionModel
from mvdit.runtime import context_parallel, fa4, fp8, sdpa
from mvdit.runtime.compile import compile_blocks
from mvdit.workflow.experiment import Experiment

log = logging.getLogger("mvdit.inference")


class SamplingSession:
    """The processes, numerics and models of one inference or evaluation run of experiment `exp` (read from
    `source`, which error messages name). Everything that can be wrong with the device or the install is found here,
    before any model loads."""

    def __init__(self, exp: Experiment, source: str | Path, device: str, tokenizer_dir: Path | None = None):
        self.exp, self.source = exp, str(source)
        d, inf, net = exp.data, exp.infer, exp.net
        self.cameras = list(d.cameras)
        self.procs = context_parallel.init_processes(device)
        self.device = self.procs.device
        self.dtype = inference_dtype(self.device, inf.precision)
        self.fp8_plan = fp8.check(inf.precision, self.device, self.source, net.head_dim)
        self.attn_kernel = sdpa.resolve(
            inf.sdpa_backend, net.num_heads, net.head_dim, self.dtype, self.device, self.source, d.text_len
        )
        self._tokenizer_dir = Path(tokenizer_dir or exp.tokenizer_dir)
        self._tokenizer: VideoTokenizer | None = None
        n_v = len(self.cameras)
        h, w = d.height // SPATIAL_COMPRESSION, d.width // SPATIAL_COMPRESSION
        self.latent_shape = (1, net.in_channels, n_v * latent_frames(d.num_frames), h, w)
        self.text_shape = (1, n_v * d.text_len, net.crossattn_emb_channels)

    @property
    def main(self) -> bool:
        return self.procs.main

    @property
    def tokenizer(self) -> VideoTokenizer:
        """The video tokenizer, opened on first use; only the main process encodes and decodes."""
        if not self.main:
            raise RuntimeError("only the main process holds the tokenizer")
        if self._tokenizer is None:
            self._tokenizer = VideoTokenizer(
                self._tokenizer_dir, device=self.device, dtype=self.dtype, pixel_chunk_frames=self.exp.data.num_frames
            )
        return self._tokenizer

    def tokenizer_on_device(self):
        """Context in which the tokenizer is on the device (and moved off afterwards with infer.offload_tokenizer)."""
        return self.tokenizer.on(self.device, self.exp.infer.offload_tokenizer)

    def load(self, checkpoint: Path, adapter: Path | None = None) -> DiffusionModel:
        """A model as inference runs it: strictly loaded (plus an unmerged LoRA adapter), in the session's dtype, with
        the FP8 kernels, context parallelism and compiled blocks the experiment asks for."""
        cfg, pickle_ok = self.exp.net, self.exp.model.allow_pickle
        if adapter is not None:
            model = load_model_with_adapter(
                cfg, checkpoint, adapter, device=self.device, dtype=self.dtype, allow_pickle=pickle_ok
            )
        else:
            model, _ = load_model(cfg, checkpoint, device=self.device, dtype=self.dtype, allow_pickle=pickle_ok)
        model.eval()
        if fa4.chosen(self.attn_kernel):  # infer.sdpa_backend fa4, or auto where FA4 runs
            n = fa4.apply(model.net)
            if self.main:
                log.info("attention: %s in %d attention modules", self.attn_kernel, n)
        if self.fp8_plan:
            counts = fp8.apply(model.net, self.fp8_plan)
            if self.main:
                log.info("fp8: %s %s", self.fp8_plan.describe(), counts)
        if self.procs.world > 1:
            mode = self.exp.infer.context_parallel
            context_parallel.enable(model, mode=mode)
            if self.main:
                log.info("context parallelism (%s) over %d processes", mode, self.procs.world)
        if self.exp.infer.compile:
            compile_blocks(model.net)
        return model

    def broadcast(self, t: Tensor | None, shape) -> Tensor:
        """The main process's tensor on every process (the others pass None)."""
        return context_parallel.broadcast_from_main(t, shape, self.dtype, self.procs)

    def encode(self, video: Tensor | None) -> Tensor:
        """Condition latent of a padded pixel video [1, 3, V*F, H, W] in [-1, 1] (given on the main process only),
        on every process."""
        gt = None
        if self.main:
            with torch.no_grad(), self.tokenizer_on_device():
                gt = self.tokenizer.encode_views(video.to(self.device, self.dtype), len(self.cameras)).to(self.dtype)
        return self.broadcast(gt, self.latent_shape)

    def sample(
        self,
        model: DiffusionModel | torch.nn.Module,
        gt: Tensor,
        text: Tensor,
        num_input_frames: int,
        *,
        steps: int,
        guidance: float,
        seed: int,
        fps: float,
        frame_repeat: float | None = None,
        batch_guidance: bool | None = None,
        progress: bool = False,
        step_callback=None,
    ) -> Tensor:
        """One sample (latent [1, 16, V*T, h, w], fp32) on every process, with the experiment's SDPA backend,
        compat mode, frame-repeat value and guidance batching (the benchmarks override the batching per variant and
        pass a bare network with a per-step callback)."""
        inf = self.exp.infer
        with sdpa.backend(inf.sdpa_backend):
            return generate(
                getattr(model, "net", model),
                gt,
                text,
                self.cameras,
                num_input_frames,
                steps=steps,
                guidance=guidance,
                seed=seed,
                compat=inf.compat,
                fps=fps,
                frame_repeat=inf.frame_repeat if frame_repeat is None else frame_repeat,
                batch_guidance=inf.batch_guidance if batch_guidance is None else batch_guidance,
                progress=progress and self.main,
                step_callback=step_callback,
            )

    def decode(self, latent: Tensor) -> Tensor:
        """Pixels [3, V*F, H, W] (float, in [-1, 1] up to the decoder's overshoot) of a latent; main process only."""
        with torch.no_grad(), self.tokenizer_on_device():
            return self.tokenizer.decode_views(latent.to(self.dtype), len(self.cameras))[0].float()

    def round_trip(self, video: Tensor) -> Tensor:
        """The tokenizer's reconstruction [3, V*F, H, W] of a pixel video [1, 3, V*F, H, W]; main process only."""
        with torch.no_grad(), self.tokenizer_on_device():
            latent = self.tokenizer.encode_views(video.to(self.device, self.dtype), len(self.cameras))
            return self.tokenizer.decode_views(latent, len(self.cameras))[0].float()

    def describe(self) -> dict:
        """What ran, for sidecars and metrics."""
        inf = self.exp.infer
        return {
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "context_parallel": self.procs.world,
            "context_parallel_mode": inf.context_parallel if self.procs.world > 1 else None,
            "dtype": str(self.dtype),
            "precision": self.fp8_plan.describe() if self.fp8_plan else {"setting": inf.precision},
            "sdpa_backend": {"setting": inf.sdpa_backend, "kernel": self.attn_kernel},
        }
