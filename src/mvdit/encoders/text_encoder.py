"""T5 text encoder wrapper (mirrors upstream `CosmosT5TextEncoder`: one prompt at a time, padded to 512, padding rows
zeroed), an on-disk prompt-embedding cache, and a reader for upstream's pickled T5 embeddings. The tiny T5 stand-in
is in mvdit.tiny.text_encoder.
"""

import gc
import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from mvdit.constants import T5_DIM, T5_MAX_LENGTH, T5_REPO

log = logging.getLogger(__name__)

_FIX = f"download it with `python src/download.py --source hf --repo {T5_REPO}` (or --source tiny)"

# ---------------------------------------------------------------------------------------------------------------
# Encoder wrapper.


class TextEncoderLoadError(RuntimeError):
    """The T5 directory is missing or unreadable; the message is one line naming the directory and the fix."""


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string")
    checked = list(prompts)
    for i, prompt in enumerate(checked):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        if not prompt.strip():
            raise ValueError(f"prompt {i} is empty")
    return checked


_IDENTITY_CONTENT_FILES = frozenset(
    {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"}
)


def encoder_identity(model_dir: Path, dtype: torch.dtype = torch.float32) -> str:
    """A cheap fingerprint of a T5 directory and the dtype it runs in, used as the embedding-cache namespace.

    Hashes the contents of the config and tokenizer files and the names and sizes of the weight files (hashing
    45 GB of weights on every run would cost minutes). Other files (README, download manifests) are ignored.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256(str(dtype).encode())
    for path in sorted(model_dir.glob("*")):
        if path.name in _IDENTITY_CONTENT_FILES:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix in {".safetensors", ".bin"} or path.name.endswith(".index.json"):
            digest.update(f"{path.name}\0{path.stat().st_size}".encode())
    return f"t5:{model_dir.name}:{digest.hexdigest()[:16]}"


class T5TextEncoder:
    """T5 encoder + tokenizer; prompts are encoded one at a time as upstream does (batch 1, padded to max_length)."""

    def __init__(
        self,
        model_dir: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = T5_MAX_LENGTH,
    ) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TextEncoderLoadError(f"T5 directory {model_dir} does not exist; {_FIX}")
        if not any((model_dir / name).is_file() for name in ("tokenizer.json", "spiece.model")):
            # Checked here because AutoTokenizer would silently build an empty T5 vocabulary instead of failing.
            raise TextEncoderLoadError(f"T5 directory {model_dir} has no tokenizer.json or spiece.model; {_FIX}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, SafetensorError, ... for bad folders
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            raise TextEncoderLoadError(
                f"cannot load T5 from {model_dir} ({type(exc).__name__}: {reason}); {_FIX}"
            ) from exc
        self.tokenizer.padding_side = "right"  # zeroing rows >= length below assumes right padding
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.max_length = max_length
        self.identity = encoder_identity(model_dir, dtype)
        self.last_lengths: list[int] = []

    @torch.no_grad()
    def encode_with_lengths(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Prompts (N) -> embeddings [N, max_length, 1024] float32 on CPU and the token count (EOS included) of each.

        Rows at index >= the token count are exactly zero, as upstream sets them.
        """
        prompts = _check_prompts(prompts)
        if self.model is None:
            raise RuntimeError("T5TextEncoder was released; build a new one to encode")
        embeddings, lengths = [], []
        for prompt in prompts:  # one at a time, as upstream: batching would not change the result, only memory
            tokens = self.tokenizer(
                prompt, truncation=True, padding="max_length", max_length=self.max_length, return_tensors="pt"
            )
            mask = tokens.attention_mask.to(self.device)
            hidden = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
            n_tokens = int(mask.sum())
            emb = hidden[0].float().cpu()
            emb[n_tokens:] = 0
            embeddings.append(emb)
            lengths.append(n_tokens)
        self.last_lengths = lengths
        return torch.stack(embeddings) if embeddings else torch.zeros(0, self.max_length, T5_DIM), lengths

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts (N) -> embeddings [N, max_length, 1024] float32 on CPU; lengths are kept in `last_lengths`."""
        return self.encode_with_lengths(prompts)[0]

    def release(self) -> None:
        """Free the model (upstream must drop T5-11B before the DiT is loaded)."""
        was_cuda = self.device.type == "cuda"
        self.model = None
        gc.collect()
        if was_cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# On-disk cache of prompt embeddings.


class EmbeddingCache:
    """Prompt embeddings as `<sha256>.safetensors` files under `cache_dir`, one prompt per file.

    Each file holds only the prompt's real rows, `embedding` [n_tokens, 1024] in float32 (exactly what the encoder
    returns; bf16, what the network consumes, is a lossless cast of it at use time), and metadata with the token
    count, prompt, encoder identity and max_length. `get` zero-pads back to [max_length, 1024], which is exact
    because the encoder zeroes every row past the token count.
    """

    def __init__(self, cache_dir: Path, identity: str, max_length: int = T5_MAX_LENGTH) -> None:
        self.cache_dir = Path(cache_dir)
        self.identity = identity
        self.max_length = max_length

    def key(self, prompt: str) -> str:
        payload = json.dumps([self.identity, self.max_length, prompt], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, prompt: str) -> Path:
        return self.cache_dir / f"{self.key(prompt)}.safetensors"

    def get_with_length(self, prompt: str) -> tuple[torch.Tensor, int] | None:
        """The cached embedding [max_length, 1024] float32 and its token count, or None on a miss."""
        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                rows = f.get_tensor("embedding")
            n_tokens = int(meta["n_tokens"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:  # a damaged entry is a miss; put() rewrites it
            log.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            return None
        if meta.get("prompt") != prompt or meta.get("identity") != self.identity or rows.shape[0] != n_tokens:
            log.warning("ignoring cache entry %s written for another prompt or encoder", path)
            return None
        emb = torch.zeros(self.max_length, rows.shape[1], dtype=torch.float32)
        emb[:n_tokens] = rows.float()
        return emb, n_tokens

    def get(self, prompt: str) -> torch.Tensor | None:
        """The cached embedding [max_length, 1024] float32, or None on a miss."""
        hit = self.get_with_length(prompt)
        return None if hit is None else hit[0]

    def put(self, prompt: str, emb: torch.Tensor, n_tokens: int | None = None) -> Path:
        """Store `emb` [max_length or n_tokens, 1024] for `prompt`; atomic (temp file + os.replace).

        `n_tokens` defaults to the index after the last non-zero row. Rows past it must be zero, so nothing is lost.
        """
        if emb.dim() != 2 or emb.shape[0] > self.max_length:
            raise ValueError(f"expected an embedding [<= {self.max_length}, D], got shape {list(emb.shape)}")
        emb = emb.detach().float().cpu()
        nonzero = emb.abs().sum(dim=1).nonzero()
        last = int(nonzero[-1]) + 1 if len(nonzero) else 0
        n_tokens = last if n_tokens is None else n_tokens
        if not last <= n_tokens <= self.max_length:
            raise ValueError(f"n_tokens={n_tokens}, but rows up to {last} are non-zero (max_length {self.max_length})")
        metadata = {
            "prompt": prompt,
            "identity": self.identity,
            "max_length": str(self.max_length),
            "n_tokens": str(n_tokens),
        }
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.path(prompt)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{final.stem}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embedding": emb[:n_tokens].contiguous()}, tmp, metadata=metadata)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return final

    def encode_cached(self, encoder_factory: Callable[[], T5TextEncoder], prompts: Sequence[str]) -> torch.Tensor:
        """Prompts (N) -> embeddings [N, max_length, 1024] float32, encoding only the prompts not yet cached.

        The encoder is built by `encoder_factory()` only if something is missing, used once for all missing prompts
        and released afterwards.
        """
        prompts = _check_prompts(prompts)
        found = {p: self.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, emb in found.items() if emb is None]
        if missing:
            encoder = encoder_factory()
            if encoder.identity != self.identity or encoder.max_length != self.max_length:
                raise ValueError(
                    f"encoder {encoder.identity} (max_length {encoder.max_length}) does not match the cache "
                    f"{self.identity} (max_length {self.max_length})"
                )
            embs, lengths = encoder.encode_with_lengths(missing)
            encoder.release()
            for prompt, emb, n_tokens in zip(missing, embs, lengths, strict=True):
                self.put(prompt, emb, n_tokens)
                found[prompt] = emb
        if not prompts:
            return torch.zeros(0, self.max_length, T5_DIM)
        return torch.stack([found[p] for p in prompts])


# ---------------------------------------------------------------------------------------------------------------
# Upstream's embedding files.


def load_upstream_t5_pickle(path: Path, allow_pickle: bool, max_length: int = T5_MAX_LENGTH) -> torch.Tensor:
    """Read an upstream `t5_xxl/<name>.pickle` (a list holding one np.float16 array [L, 1024]) -> [max_length, 1024].

    Returned as float32 (an exact cast), zero-padded (or truncated, as upstream's multiview loader does) to
    max_length rows. Unpickling can run arbitrary code, so it is refused unless `allow_pickle` is True.
    """
    path = Path(path)
    if not allow_pickle:
        raise ValueError(
            f"refusing to unpickle {path}: pickle files can run arbitrary code; pass allow_pickle=True only for "
            "files you trust (or convert them once into the safetensors embedding cache)"
        )
    with path.open("rb") as f:
        data = pickle.load(f)  # only reached behind the explicit opt-in above
    array = data[0] if isinstance(data, (list, tuple)) and len(data) > 0 else data
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != T5_DIM:
        shape = getattr(array, "shape", None)
        raise ValueError(f"{path} does not hold a T5 embedding [L, {T5_DIM}] (found {type(array).__name__} {shape})")
    emb = torch.from_numpy(np.asarray(array, dtype=np.float32))[:max_length]
    return torch.cat([emb, emb.new_zeros(max_length - emb.shape[0], T5_DIM)])
