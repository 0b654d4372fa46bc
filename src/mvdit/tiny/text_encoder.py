"""The tiny T5 encoder: a 2-layer T5 of the real width (1024) with a small Unigram tokenizer built offline, saved
as transformers saves T5 (config.json, model.safetensors, tokenizer files) so that mvdit.encoders.text_encoder loads
it exactly as it loads T5-11B.
"""

import json
import math
import re
import string
from collections import Counter
from pathlib import Path

import torch

from mvdit.constants import T5_DIM, T5_MAX_LENGTH

# Tiny stand-in: a 2-layer T5 encoder of the real width (1024) and a small Unigram tokenizer built offline.

_TINY_CORPUS = (
    "The video is captured from a camera mounted on a car. The camera is facing forward.",
    "The video is captured from a camera mounted on a car. The camera is facing to the left.",
    "The video is captured from a camera mounted on a car. The camera is facing to the right.",
    "The video is captured from a camera mounted on a car. The camera is facing backwards.",
    "The video is captured from a camera mounted on a car. The camera is facing the rear left side.",
    "The video is captured from a camera mounted on a car. The camera is facing the rear right side.",
    "A car drives down a wet city street at night, with traffic lights and pedestrians on the sidewalk.",
    "The ego vehicle follows a white truck on a highway under a clear blue sky.",
    "Snow covers the road and the trees along both sides of a quiet country lane at sunset.",
    "A cyclist crosses the intersection while several cars wait at the red light.",
    "The vehicle turns left at a roundabout; buildings, parked cars and a bus stop are visible.",
    "Heavy rain falls on a busy urban road, and the wipers move across the windshield.",
    "A long tunnel with bright lamps on the ceiling opens onto a bridge over a river.",
    "Trucks, vans and motorcycles share a multi-lane road in the early morning fog.",
    "The sun is low and casts long shadows of poles, signs and fences across the asphalt.",
    "A school bus stops ahead; children walk along the crosswalk near a small park.",
    "The scene shows a parking lot with many cars, a shopping center and green trees.",
    "Construction cones narrow the lane, and a worker in an orange vest holds a sign.",
)
_TINY_T5 = dict(d_model=T5_DIM, d_kv=32, d_ff=256, num_layers=2, num_heads=4, feed_forward_proj="relu")


def _tiny_vocab() -> list[tuple[str, float]]:
    """Unigram pieces and log-probabilities: every corpus word, then every printable ASCII character.

    Counted by hand rather than with `tokenizers`' UnigramTrainer, whose multithreaded EM changes the last bits of
    the scores from run to run. Words score about -3..-7, characters -12, so known words stay whole and any other
    ASCII text falls back to characters without <unk>.
    """
    counts = Counter(re.findall(r"[A-Za-z]+", " ".join(_TINY_CORPUS)))
    total = sum(counts.values())
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's ids 0, 1, 2
    vocab += [("▁" + w, math.log(counts[w] / total)) for w in words]
    vocab += [(c, -12.0) for c in "▁" + string.ascii_letters + string.digits + string.punctuation]
    return vocab


def _tiny_tokenizer_object():
    """A T5-like Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, metaspace pre-tokenizer, EOS appended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(_tiny_vocab(), unk_id=2, byte_fallback=False))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def build_tiny_t5(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny T5 encoder (config.json, model.safetensors) and its fast tokenizer to `out_dir`.

    d_model is 1024 so the embeddings have the real width [L, 1024]; everything else is tiny (2 layers, 4 heads of
    32, d_ff 256, a ~250-piece vocabulary). Deterministic given `seed`; nothing is downloaded.
    """
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_tiny_tokenizer_object(),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=T5_MAX_LENGTH,
    )
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1), "T5 expects <pad>=0 and </s>=1"
    tokenizer.save_pretrained(out_dir)
    # Declare the class upstream loads (T5TokenizerFast) without sentinel <extra_id_*> tokens, which the tiny vocab
    # lacks; the tokenizer.json written above holds the whole pipeline, so both loaders give the same ids.
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.update(tokenizer_class="T5TokenizerFast", extra_ids=0)
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")

    config = T5Config(
        vocab_size=len(tokenizer),
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **_TINY_T5,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
