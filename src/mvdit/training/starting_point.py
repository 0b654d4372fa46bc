"""The weights a training run starts from: the release (with the experiment's reinit/ignore lists, for a preset that
differs from the release on purpose), seeded random weights, or any model.pt loaded strictly against the preset
(another run's post-trained model or one of its saved iterations, upstream's post-trained file).
"""

from __future__ import annotations

import logging
import os

from torch import Tensor

from mvdit.assets.checkpoint import build_model, load_model
from mvdit.workflow.experiment import RELEASE, Experiment

log = logging.getLogger(__name__)


def initial_state_dict(exp: Experiment, path: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """The full fp32 state dict `exp` trains from (also the base a LoRA adapter of this run applies to); `path`
    replaces the file `train.init` names (the release's model.pt found elsewhere, say)."""
    init = exp.init_checkpoint if path is None or exp.init_checkpoint is None else path
    if init is None:
        return build_model(exp.net, seed=exp.train.seed).state_dict()
    from_release = exp.train.init == RELEASE  # the reinit/ignore lists describe the release, not our own files
    model, report = load_model(
        exp.net,
        init,
        reinit=exp.model.reinit if from_release else (),
        ignore=exp.model.ignore_keys,
        allow_pickle=exp.model.allow_pickle,
    )
    log.info("loaded %d tensors from %s (%d re-initialised)", len(report.loaded), init, len(report.reinitialised))
    return model.state_dict()
