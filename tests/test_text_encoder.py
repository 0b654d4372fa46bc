"""T5 wrapper, tiny T5 stand-in, embedding cache and upstream pickle reader."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from mvdit.encoders.text_encoder import (
    EmbeddingCache,
    T5TextEncoder,
    TextEncoderLoadError,
    encoder_identity,
    load_upstream_t5_pickle,
)
from mvdit.tiny.text_encoder import build_tiny_t5

PROMPTS = [
    "The video is captured from a camera mounted on a car. The camera is facing to the left. ",
    "A red bus overtakes a cyclist on a snowy bridge.",
    "Zebra!",
]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("t5")
    build_tiny_t5(out)
    return out


SHORT = 64  # max_length for most tests: 512 rows cost ~10x the time and exercise nothing more


@pytest.fixture(scope="module")
def encoder(t5_dir) -> T5TextEncoder:
    return T5TextEncoder(t5_dir, max_length=SHORT)


def test_tiny_t5_files_load_like_the_real_checkpoint(t5_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in t5_dir.iterdir()
    }
    config = json.loads((t5_dir / "config.json").read_text())
    assert config["d_model"] == 1024 and config["num_layers"] <= 2
    tokenizer = AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
    ids = tokenizer(PROMPTS[1]).input_ids
    assert ids[-1] == 1 and tokenizer.unk_token_id not in ids
    assert max(ids) < config["vocab_size"]


def test_tiny_t5_is_deterministic_given_the_seed(t5_dir, tmp_path):
    build_tiny_t5(tmp_path / "same", seed=0)
    build_tiny_t5(tmp_path / "other", seed=1)
    ref = load_file(t5_dir / "model.safetensors")
    same = load_file(tmp_path / "same" / "model.safetensors")
    other = load_file(tmp_path / "other" / "model.safetensors")
    assert ref.keys() == same.keys() and all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], other[k]) for k in ref)
    assert (tmp_path / "same" / "tokenizer.json").read_bytes() == (t5_dir / "tokenizer.json").read_bytes()


def test_default_output_is_padded_to_512_rows_of_width_1024(t5_dir):
    emb = T5TextEncoder(t5_dir).encode([PROMPTS[1]])
    assert emb.shape == (1, 512, 1024) and emb.dtype == torch.float32 and emb.device.type == "cpu"


def test_padding_rows_are_zero_and_token_rows_are_not(encoder):
    emb, lengths = encoder.encode_with_lengths(PROMPTS)
    assert emb.shape == (3, SHORT, 1024)
    for row, n_tokens, prompt in zip(emb, lengths, PROMPTS, strict=True):
        assert n_tokens == len(encoder.tokenizer(prompt).input_ids)  # EOS included
        assert (row[n_tokens:] == 0).all()
        assert (row[:n_tokens].abs().sum(dim=1) > 0).all()
    assert encoder.last_lengths == lengths


def test_each_prompt_is_encoded_independently(encoder):
    together = encoder.encode(PROMPTS)
    alone = torch.cat([encoder.encode([p]) for p in PROMPTS])
    assert torch.equal(together, alone)
    assert torch.equal(encoder.encode(PROMPTS[::-1]), together.flip(0))


def test_long_prompts_are_truncated_keeping_eos(t5_dir):
    short = T5TextEncoder(t5_dir, max_length=16)
    emb, lengths = short.encode_with_lengths([" ".join(["camera"] * 40)])
    assert emb.shape == (1, 16, 1024) and lengths == [16]
    assert short.tokenizer(" ".join(["camera"] * 40), truncation=True, max_length=16).input_ids[-1] == 1


@pytest.mark.parametrize("prompts", [[""], ["ok", "   "], [None], ["ok", 3], "a single string"])
def test_bad_prompts_raise_value_error(encoder, prompts):
    with pytest.raises(ValueError, match="prompt"):
        encoder.encode(prompts)


def test_release_frees_the_model(t5_dir):
    enc = T5TextEncoder(t5_dir)
    enc.release()
    assert enc.model is None
    with pytest.raises(RuntimeError, match="released"):
        enc.encode(["hello"])


def _corrupt_weights(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\x00" * 64)


def _drop_config(path: Path) -> None:
    (path / "config.json").unlink()


def _drop_tokenizer(path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()


@pytest.mark.parametrize("damage", [None, _corrupt_weights, _drop_config, _drop_tokenizer])
def test_load_errors_name_the_directory_on_one_line(t5_dir, tmp_path, damage):
    target = tmp_path / "t5"
    if damage is not None:
        target.mkdir()
        for f in t5_dir.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        damage(target)
    with pytest.raises(TextEncoderLoadError) as err:
        T5TextEncoder(target)
    assert str(target) in str(err.value) and "\n" not in str(err.value)


class _CountingFactory:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.calls = 0
        self.encoded: list[str] = []

    def __call__(self) -> T5TextEncoder:
        self.calls += 1
        enc = T5TextEncoder(self.model_dir, max_length=SHORT)
        original = enc.encode_with_lengths

        def spy(prompts):
            self.encoded.extend(prompts)
            return original(prompts)

        enc.encode_with_lengths = spy
        return enc


def test_cache_encodes_each_prompt_once_and_skips_the_encoder_on_hits(t5_dir, encoder, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache", identity=encoder_identity(t5_dir), max_length=SHORT)
    factory = _CountingFactory(t5_dir)
    first = cache.encode_cached(factory, [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert factory.calls == 1 and factory.encoded == PROMPTS[:2]
    expected = encoder.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    again = cache.encode_cached(factory, [PROMPTS[1], PROMPTS[0]])
    assert factory.calls == 1
    torch.testing.assert_close(again, expected[[1, 0]], rtol=0, atol=0)
    cache.encode_cached(factory, PROMPTS)
    assert factory.calls == 2 and factory.encoded == PROMPTS
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".safetensors"] * 3  # no temp files left


def test_cache_survives_reload_and_stores_the_token_length(t5_dir, encoder, tmp_path):
    identity = encoder_identity(t5_dir)
    emb, lengths = encoder.encode_with_lengths([PROMPTS[1]])
    path = EmbeddingCache(tmp_path, identity, max_length=SHORT).put(PROMPTS[1], emb[0], lengths[0])
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["n_tokens"] == str(lengths[0])
        assert f.get_tensor("embedding").shape == (lengths[0], 1024)
    reloaded = EmbeddingCache(tmp_path, identity, max_length=SHORT)
    hit = reloaded.get_with_length(PROMPTS[1])
    assert hit is not None and hit[1] == lengths[0]
    assert torch.equal(hit[0], emb[0])
    assert reloaded.get(PROMPTS[0]) is None


def test_cache_key_depends_on_encoder_and_max_length(tmp_path):
    emb = torch.zeros(512, 1024)
    emb[:3] = 1.0
    EmbeddingCache(tmp_path, "enc-a").put("hello", emb)
    assert EmbeddingCache(tmp_path, "enc-a").get_with_length("hello")[1] == 3  # length inferred from the rows
    assert EmbeddingCache(tmp_path, "enc-b").get("hello") is None
    assert EmbeddingCache(tmp_path, "enc-a", max_length=256).get("hello") is None
    with pytest.raises(ValueError, match="non-zero"):
        EmbeddingCache(tmp_path, "enc-a").put("hello", emb, n_tokens=2)


def test_corrupt_cache_entry_is_a_miss(tmp_path):
    cache = EmbeddingCache(tmp_path, "enc")
    cache.path("hello").write_bytes(b"garbage")
    assert cache.get("hello") is None


def test_cache_rejects_an_encoder_of_another_identity(t5_dir, tmp_path):
    cache = EmbeddingCache(tmp_path, identity="some-other-encoder")
    with pytest.raises(ValueError, match="does not match"):
        cache.encode_cached(lambda: T5TextEncoder(t5_dir), ["hello"])


def test_cache_validates_prompts_before_building_the_encoder(tmp_path):
    def factory():
        raise AssertionError("must not be called")

    with pytest.raises(ValueError, match="empty"):
        EmbeddingCache(tmp_path, "enc").encode_cached(factory, ["ok", ""])


class _SideEffect:
    """Unpickling this object creates a file: proof of whether the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_upstream_pickle_is_refused_without_opt_in(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps([_SideEffect(marker)]))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_upstream_t5_pickle(path, allow_pickle=False)
    assert not marker.exists()


def test_upstream_pickle_is_read_and_zero_padded_with_opt_in(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.standard_normal((7, 1024)).astype(np.float16)
    path = tmp_path / "clip.pickle"
    path.write_bytes(pickle.dumps([array]))
    emb = load_upstream_t5_pickle(path, allow_pickle=True)
    assert emb.shape == (512, 1024) and emb.dtype == torch.float32
    assert torch.equal(emb[:7], torch.from_numpy(array.astype(np.float32)))
    assert (emb[7:] == 0).all()
    long = tmp_path / "long.pickle"
    long.write_bytes(pickle.dumps([np.ones((600, 1024), np.float16)]))
    assert load_upstream_t5_pickle(long, allow_pickle=True).shape == (512, 1024)
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(pickle.dumps([np.ones((7, 512), np.float16)]))
    with pytest.raises(ValueError, match="T5 embedding"):
        load_upstream_t5_pickle(bad, allow_pickle=True)


def test_encoder_identity_tracks_config_and_dtype_but_not_manifests(t5_dir, tmp_path):
    copy = tmp_path / t5_dir.name
    copy.mkdir()
    for f in t5_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    base = encoder_identity(copy)
    assert base == encoder_identity(t5_dir)
    (copy / ".mvdit_manifest.json").write_text('{"downloaded": "today"}')
    assert encoder_identity(copy) == base
    assert encoder_identity(copy, torch.bfloat16) != base
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
    assert encoder_identity(copy) != base
