"""mvdit: the multiview diffusion transformer of Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview.

Network, EDM denoiser, samplers, training loss, tokenizer/text-encoder wrappers and data, with no distributed code.
"""

from mvdit.constants import CAMERAS, SIGMA_DATA

__all__ = ["CAMERAS", "SIGMA_DATA"]
