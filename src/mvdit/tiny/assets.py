"""The "tiny" checkpoint source: a tiny DiT, video tokenizer and T5 encoder written in the real file formats and
the real directory layout, so every later rule runs the same code for the demo as for the 7B model.
"""

from __future__ import annotations

from pathlib import Path

from mvdit.assets.checkpoint import build_model
from mvdit.assets.files import save_state_dict, write_json
from mvdit.constants import DIT_REPO, REPO_SUBDIRS, T5_REPO, TOKENIZER_REPO
from mvdit.model.config import get_preset
from mvdit.tiny.text_encoder import build_tiny_t5
from mvdit.tiny.tokenizer import build_tiny_tokenizer


def local_dir(checkpoint_dir: Path, repo: str) -> Path:
    return Path(checkpoint_dir) / REPO_SUBDIRS[repo]


def build_tiny_dit(out_dir: Path, seed: int = 0, preset: str = "tiny") -> None:
    """model.pt (net.* + logvar.*, bf16 like the release) and config.json describing it."""
    cfg = get_preset(preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, seed=seed)
    save_state_dict(out_dir / "model.pt", model.state_dict())
    write_json(out_dir / "config.json", {"preset": preset, "net": cfg.to_dict(), "tiny": True, "seed": seed})


def build_tiny_assets(checkpoint_dir: Path, seed: int = 0, repos: list[str] | None = None) -> None:
    """Fill <checkpoint_dir>/<repo name>/ for the DiT, tokenizer and T5 repos with tiny stand-ins."""
    builders = {DIT_REPO: build_tiny_dit, TOKENIZER_REPO: build_tiny_tokenizer, T5_REPO: build_tiny_t5}
    for repo in repos or list(builders):
        out = local_dir(checkpoint_dir, repo)
        out.mkdir(parents=True, exist_ok=True)
        builders[repo](out, seed=seed)
        made = "a linear tokenizer fitted to the synthetic renderer" if repo == TOKENIZER_REPO else "random weights"
        (out / "README.md").write_text(
            f"Tiny stand-in for {repo}, made by mvdit.tiny.assets ({made}; same file formats and layout).\n"
        )
