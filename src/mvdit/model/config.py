"""Network configuration and architecture presets.

One frozen dataclass describes the multiview DiT; presets name the released 7B shapes, the variant upstream's own
post-training config builds, and a tiny model of the same architecture for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetConfig:
    """Shapes of `MultiviewDiT`. Field names follow upstream's constructor where one exists."""

    in_channels: int = 16  # latent channels
    out_channels: int = 16
    model_channels: int = 4096  # D
    num_blocks: int = 28
    num_heads: int = 32
    mlp_ratio: float = 4.0
    patch_spatial: int = 2
    patch_temporal: int = 1
    crossattn_emb_channels: int = 1024  # T5-11B width
    adaln_lora_dim: int = 256
    n_views: int = 6
    view_condition_dim: int = 6  # width of the view embedding planes concatenated to the input
    add_repeat_frame_embedding: bool = True  # Linear(1 -> view_condition_dim) of frame_repeat, added to the view emb
    concat_padding_mask: bool = True
    max_img_h: int = 240  # RoPE / abs-pos tables cover max_img_h // patch_spatial rows
    max_img_w: int = 240
    max_frames: int = 128
    rope_h_extrapolation_ratio: float = 1.0
    rope_w_extrapolation_ratio: float = 1.0
    rope_t_extrapolation_ratio: float = 2.0  # the released experiment overrides net.py's 1.0 with 2.0
    extra_h_extrapolation_ratio: float = 1.0
    extra_w_extrapolation_ratio: float = 1.0
    extra_t_extrapolation_ratio: float = 1.0
    base_fps: float = 24.0  # RoPE time positions are t / fps * base_fps

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def input_planes(self) -> int:
        """Planes fed to the patch embedding: latent, condition mask, padding mask, view embedding."""
        return self.in_channels + 1 + int(self.concat_padding_mask) + self.view_condition_dim

    def replace(self, **changes) -> NetConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown network config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_upstream(cls, d: dict) -> NetConfig:
        """Read an upstream network constructor config (e.g. the `net_config` metadata of a reference vector).

        Keys that change the computation must have the values this implementation supports; keys upstream accepts
        but ignores for this network are skipped.
        """
        required = {
            "block_config": "FA-CA-MLP",
            "pos_emb_cls": "rope3d",
            "block_x_format": "THWBD",
            "affline_emb_norm": True,
            "use_adaln_lora": True,
            "use_cross_attn_mask": False,
            "concat_traj_embedding": False,
            "concat_view_embedding": True,
            "extra_per_block_abs_pos_emb": True,
        }
        for key, want in required.items():
            if key in d and d[key] != want:
                raise ValueError(f"unsupported upstream net config: {key}={d[key]!r} (only {want!r} is implemented)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "patch_temporal" in kwargs and kwargs["patch_temporal"] != 1:
            raise ValueError("unsupported upstream net config: patch_temporal must be 1")
        ignored = sorted(set(d) - names - set(required))
        log.debug("upstream net config keys without effect here: %s", ignored)
        return cls(**kwargs)


# Architecture presets. The released checkpoint's input layer has a 6-wide view embedding plus the repeat-frame
# embedding (96 patch inputs); upstream's post-training experiment builds the 3-wide variant without it (84 inputs).
MODELS: dict[str, NetConfig] = {
    "7b-multiview": NetConfig(),
    "7b-multiview-posttrain": NetConfig(view_condition_dim=3, add_repeat_frame_embedding=False),
    "tiny": NetConfig(model_channels=128, num_blocks=2, num_heads=4, adaln_lora_dim=32),
    "tiny-posttrain": NetConfig(
        model_channels=128,
        num_blocks=2,
        num_heads=4,
        adaln_lora_dim=32,
        view_condition_dim=3,
        add_repeat_frame_embedding=False,
    ),
}


def get_preset(name: str, **overrides) -> NetConfig:
    """Look up an architecture preset by name, optionally overriding fields."""
    if name not in MODELS:
        raise KeyError(f"unknown model preset {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name].replace(**overrides) if overrides else MODELS[name]
