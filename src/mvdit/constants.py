"""Constants shared by every part of the package (camera order and EDM scale of the released model)."""

# View order of the released model: index v of the view embedding and of the view-major (V T) time axis.
CAMERAS: tuple[str, ...] = ("front", "left", "right", "back", "back_left", "back_right")

# EDM sigma_data; latents seen by the network are the normalised tokenizer output times this.
SIGMA_DATA: float = 0.5

# Causal video tokenizer (Cosmos-Tokenize1-CV8x8x8): 1 + 8k pixel frames -> 1 + k latent frames, 8x spatial.
TEMPORAL_COMPRESSION: int = 8
SPATIAL_COMPRESSION: int = 8
LATENT_CHANNELS: int = 16
PIXEL_CHUNK_FRAMES: int = 57  # one chunk of the released setup -> 8 latent frames

# T5-11B encoder output width and the padded prompt length used upstream.
T5_DIM: int = 1024
T5_MAX_LENGTH: int = 512

# Hub repositories, laid out under checkpoints/<repo name> as upstream does.
DIT_REPO = "nvidia/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"
TOKENIZER_REPO = "nvidia/Cosmos-Tokenize1-CV8x8x8-720p"
T5_REPO = "google-t5/t5-11b"
# Their folders under the checkpoint dir, as upstream lays them out (google-t5/t5-11b keeps its org folder).
REPO_SUBDIRS: dict[str, str] = {
    DIT_REPO: "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview",
    TOKENIZER_REPO: "Cosmos-Tokenize1-CV8x8x8-720p",
    T5_REPO: "google-t5/t5-11b",
}


def latent_frames(num_frames: int) -> int:
    """Latent frames of a clip of `num_frames` pixel frames: the causal tokenizer maps 1 + 8k frames to 1 + k."""
    return 1 + (num_frames - 1) // TEMPORAL_COMPRESSION
