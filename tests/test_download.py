"""Checkpoint download (mvdit.assets.hub, src/download.py) with the real huggingface_hub client against a fake Hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from mvdit.assets import hub
from mvdit.constants import DIT_REPO, T5_REPO, TOKENIZER_REPO
from tests.fake_hub import FakeHub, FakeRepo, git_blob_sha1

ROOT = Path(__file__).resolve().parents[1]


def _blob(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)  # distinct per file, so CDN digests never collide


def _repos() -> dict[str, FakeRepo]:
    dit = {
        "model.pt": _blob("dit/model.pt", 200_000),  # > 3 chunks of 64 KiB, for the Range-resume test
        "config.json": b'{"model": "fake-dit"}',
        "README.md": b"# fake DiT\n",
        ".gitattributes": b"*.pt filter=lfs\n",
        "guardrail/guard.jit": _blob("dit/guard", 500),
    }
    tok = {
        "encoder.jit": _blob("tok/encoder", 3000),
        "decoder.jit": _blob("tok/decoder", 4000),
        "autoencoder.jit": _blob("tok/autoencoder", 5000),
        "mean_std.pt": _blob("tok/mean_std", 700),
        "config.json": b'{"tokenizer": "fake"}',
        "README.md": b"# fake tokenizer\n",
    }
    t5 = {
        "config.json": b'{"d_model": 8}',
        "pytorch_model.bin": _blob("t5/bin", 6000),
        "model.safetensors": _blob("t5/st", 6000),
        "tf_model.h5": _blob("t5/h5", 6000),
        "flax_model.msgpack": _blob("t5/flax", 6000),
        "spiece.model": _blob("t5/spiece", 900),
        "tokenizer.json": b'{"model": "unigram"}',
        "generation_config.json": b"{}",
        "README.md": b"# fake t5\n",
    }
    return {
        DIT_REPO: FakeRepo(dit, frozenset({"model.pt", "guardrail/guard.jit"})),
        TOKENIZER_REPO: FakeRepo(tok, frozenset({"encoder.jit", "decoder.jit", "autoencoder.jit", "mean_std.pt"})),
        # Served "direct" (LFS bytes from /resolve) to cover both ways the Hub hands out LFS files.
        T5_REPO: FakeRepo(
            t5,
            frozenset({"pytorch_model.bin", "model.safetensors", "tf_model.h5", "flax_model.msgpack", "spiece.model"}),
            lfs_mode="direct",
        ),
    }


EXPECTED = {
    "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview": (DIT_REPO, ["README.md", "config.json", "model.pt"]),
    "Cosmos-Tokenize1-CV8x8x8-720p": (TOKENIZER_REPO, ["config.json", "decoder.jit", "encoder.jit", "mean_std.pt"]),
    "google-t5/t5-11b": (T5_REPO, ["config.json", "pytorch_model.bin", "spiece.model", "tokenizer.json"]),
}
NOT_FETCHED = [
    f"{DIT_REPO}/guardrail/guard.jit",
    f"{TOKENIZER_REPO}/autoencoder.jit",
    f"{T5_REPO}/tf_model.h5",
    f"{T5_REPO}/flax_model.msgpack",
    f"{T5_REPO}/model.safetensors",
]


@pytest.fixture(scope="session")
def hub_server():
    server = FakeHub(_repos()).start()
    yield server
    server.stop()


@pytest.fixture
def fake_hub(hub_server, tmp_path, monkeypatch):
    """Point the already-imported client at the fake Hub: its constants are frozen at import (spec P1)."""
    from huggingface_hub import constants

    ep = hub_server.endpoint
    monkeypatch.setattr(constants, "ENDPOINT", ep)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", ep + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"), raising=False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", ep)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # The real MD5 pins cannot match fake bytes: pin the fake files' MD5s so the check still runs.
    for repo_id, spec in list(hub.REPOS.items()):
        files = hub_server.repos[repo_id].files
        md5 = {p: hashlib.md5(files[p]).hexdigest() for p in spec.md5}
        monkeypatch.setitem(hub.REPOS, repo_id, replace(spec, md5=md5))
    monkeypatch.setattr(hub, "RETRY_BACKOFF_S", 0.0)
    hub_server.reset()
    return hub_server


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return tmp_path / "checkpoints"


def _manifest(ckpt: Path, subdir: str) -> dict:
    return json.loads((ckpt / subdir / hub.MANIFEST_NAME).read_text())


def _api_requests(fake: FakeHub) -> list:
    return [r for r in fake.requests() if r.path.startswith("/api/models/")]


# ---- full download ---------------------------------------------------------------------------------------------


def test_downloads_needed_files_into_upstream_layout(fake_hub, ckpt):
    manifests = hub.download_all(ckpt)

    assert [m.parent.relative_to(ckpt).as_posix() for m in manifests] == list(EXPECTED)
    for subdir, (repo_id, files) in EXPECTED.items():
        present = sorted(
            p.relative_to(ckpt / subdir).as_posix()
            for p in (ckpt / subdir).rglob("*")
            if p.is_file() and ".cache" not in p.parts and p.name != hub.MANIFEST_NAME
        )
        assert present == files
        for f in files:
            assert (ckpt / subdir / f).read_bytes() == fake_hub.repos[repo_id].files[f]
    touched = fake_hub.touched_files()
    assert not [key for key in NOT_FETCHED if key in touched]


def test_manifest_lists_verified_files(fake_hub, ckpt):
    hub.download_all(ckpt, [TOKENIZER_REPO, T5_REPO])

    for subdir, (repo_id, files) in list(EXPECTED.items())[1:]:
        m = _manifest(ckpt, subdir)
        repo = fake_hub.repos[repo_id]
        assert (m["repo_id"], m["source"], m["revision"], m["commit"]) == (repo_id, "hf", "main", repo.sha)
        assert m["endpoint"] == fake_hub.endpoint and m["created"]
        assert [e["path"] for e in m["files"]] == files
        for e in m["files"]:
            assert e["size"] == len(repo.files[e["path"]])
            assert e["sha256"] == hashlib.sha256(repo.files[e["path"]]).hexdigest()
        assert m["total_size"] == sum(e["size"] for e in m["files"])
        assert (ckpt / subdir / hub.RECORD_PATH).read_text() == (ckpt / subdir / hub.MANIFEST_NAME).read_text()
    md5_entries = {e["path"]: e["md5"] for e in _manifest(ckpt, "google-t5/t5-11b")["files"] if "md5" in e}
    assert md5_entries == {
        "pytorch_model.bin": hashlib.md5(fake_hub.repos[T5_REPO].files["pytorch_model.bin"]).hexdigest()
    }
    assert not list(ckpt.rglob("*.tmp"))


def test_rerun_skips_network_while_the_local_copy_verifies(fake_hub, ckpt):
    hub.download_all(ckpt)
    fake_hub.reset()

    hub.download_all(ckpt)
    assert fake_hub.requests() == []

    # Snakemake deletes a rule's output before rerunning it: the record copy still proves the download.
    for subdir in EXPECTED:
        (ckpt / subdir / hub.MANIFEST_NAME).unlink()
    hub.download_all(ckpt)
    assert fake_hub.requests() == []
    assert all((ckpt / subdir / hub.MANIFEST_NAME).is_file() for subdir in EXPECTED)

    # With no manifest at all the Hub's metadata is fetched, but the files are only hashed, not transferred.
    for subdir in EXPECTED:
        (ckpt / subdir / hub.MANIFEST_NAME).unlink()
        (ckpt / subdir / hub.RECORD_PATH).unlink()
    hub.download_all(ckpt)
    assert fake_hub.file_gets() == [] and len(_api_requests(fake_hub)) == 3
    assert all((ckpt / subdir / hub.MANIFEST_NAME).is_file() for subdir in EXPECTED)


# ---- faults ----------------------------------------------------------------------------------------------------


def test_interrupted_transfer_resumes_with_range(fake_hub, ckpt, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)  # the default 10 MiB grain exceeds our files
    key = f"{DIT_REPO}/model.pt"
    fake_hub.cut(key, after_bytes=100_000)

    manifest = json.loads(hub.download_repo(DIT_REPO, ckpt).read_text())

    gets = fake_hub.file_gets(key)
    assert [g.status for g in gets] == [200, 206]
    assert gets[0].range is None and int(gets[1].range.removeprefix("bytes=").rstrip("-")) >= 64 * 1024
    want = hashlib.sha256(fake_hub.repos[DIT_REPO].files["model.pt"]).hexdigest()
    assert {e["path"]: e["sha256"] for e in manifest["files"]}["model.pt"] == want


def test_transient_server_error_is_retried(fake_hub, ckpt):
    fake_hub.fail(f"/api/models/{TOKENIZER_REPO}", 503, times=1)

    hub.download_repo(TOKENIZER_REPO, ckpt)

    assert [r.status for r in _api_requests(fake_hub)][:2] == [503, 200]


def test_persistent_server_error_gives_network_error(fake_hub, ckpt):
    fake_hub.fail(f"/api/models/{TOKENIZER_REPO}", 503, times=10)

    with pytest.raises(hub.DownloadError, match="network failure .* after 3 attempts") as err:
        hub.download_repo(TOKENIZER_REPO, ckpt)

    assert "\n" not in str(err.value)
    assert len(_api_requests(fake_hub)) == 3


@pytest.mark.parametrize(
    ("repo_id", "path"),
    [(TOKENIZER_REPO, "encoder.jit"), (TOKENIZER_REPO, "config.json"), (T5_REPO, "pytorch_model.bin")],
    ids=["lfs-cdn", "regular", "lfs-direct"],
)
def test_corrupt_transfer_is_detected_and_fetched_again(fake_hub, ckpt, repo_id, path):
    key = f"{repo_id}/{path}"
    fake_hub.corrupt(key, times=1)

    manifest_path = hub.download_repo(repo_id, ckpt)

    assert len(fake_hub.file_gets(key)) == 2
    assert (manifest_path.parent / path).read_bytes() == fake_hub.repos[repo_id].files[path]


def test_persistently_corrupt_file_raises_naming_it(fake_hub, ckpt):
    fake_hub.corrupt(f"{TOKENIZER_REPO}/encoder.jit", times=2)

    with pytest.raises(hub.DownloadError) as err:
        hub.download_repo(TOKENIZER_REPO, ckpt)

    msg = str(err.value)
    want = hashlib.sha256(fake_hub.repos[TOKENIZER_REPO].files["encoder.jit"]).hexdigest()
    assert "encoder.jit" in msg and f"expected {want}" in msg and "rerun" in msg and "\n" not in msg
    local = hub.local_dir_for(ckpt, TOKENIZER_REPO)
    assert not (local / "encoder.jit").exists() and not (local / hub.MANIFEST_NAME).exists()


def test_file_corrupted_on_disk_is_repaired(fake_hub, ckpt):
    local = hub.download_repo(DIT_REPO, ckpt).parent
    data = bytearray((local / "model.pt").read_bytes())
    data[1000] ^= 1
    (local / "model.pt").write_bytes(bytes(data))
    fake_hub.reset()

    hub.download_repo(DIT_REPO, ckpt)

    # The client keeps the bad file (its metadata says current); our check deletes and fetches it.
    assert len(fake_hub.file_gets(f"{DIT_REPO}/model.pt")) == 1
    assert (local / "model.pt").read_bytes() == fake_hub.repos[DIT_REPO].files["model.pt"]


def test_md5_pin_mismatch_is_reported_without_refetch(fake_hub, ckpt, monkeypatch):
    spec = hub.REPOS[DIT_REPO]
    monkeypatch.setitem(hub.REPOS, DIT_REPO, replace(spec, md5={"model.pt": "0" * 32}))

    with pytest.raises(hub.DownloadError, match=r"model\.pt has md5 .* expected 0{32}.*--revision"):
        hub.download_repo(DIT_REPO, ckpt)

    assert len(fake_hub.file_gets(f"{DIT_REPO}/model.pt")) == 1


# ---- access errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "hf_wrong"], ids=["anonymous", "token-without-access"])
def test_gated_repo_without_access_explains_license_and_token(fake_hub, ckpt, monkeypatch, token):
    fake_hub.gate(DIT_REPO, "hf_granted")
    if token:
        monkeypatch.setenv("HF_TOKEN", token)

    with pytest.raises(hub.DownloadError) as err:
        hub.download_repo(DIT_REPO, ckpt)

    msg = str(err.value)
    assert "gated" in msg and "license" in msg and "HF_TOKEN" in msg and "hf auth login" in msg and "\n" not in msg
    assert not (hub.local_dir_for(ckpt, DIT_REPO) / hub.MANIFEST_NAME).exists()


def test_gated_repo_with_token_downloads(fake_hub, ckpt, monkeypatch):
    fake_hub.gate(DIT_REPO, "hf_granted")
    monkeypatch.setenv("HF_TOKEN", "hf_granted")

    hub.download_repo(DIT_REPO, ckpt)

    assert all(r.auth == "Bearer hf_granted" for r in fake_hub.requests() if "/resolve/" in r.path)


def test_missing_repo_is_a_clear_error(fake_hub, ckpt):
    spec = hub.RepoSpec("nobody/does-not-exist", "does-not-exist", required=("model.pt",))

    with pytest.raises(hub.DownloadError, match=r"nobody/does-not-exist not found at .*HF_TOKEN") as err:
        hub.download_repo(spec, ckpt)

    assert "\n" not in str(err.value)


def test_rejected_token_points_at_hf_token(fake_hub, ckpt, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    fake_hub.fail(f"/api/models/{DIT_REPO}", 401)  # no X-Error-Code, like "Invalid credentials"

    with pytest.raises(hub.DownloadError, match=r"refused the request .*401.*check HF_TOKEN"):
        hub.download_repo(DIT_REPO, ckpt)


def test_required_file_absent_from_repo_is_named(fake_hub, ckpt):
    spec = replace(hub.REPOS[DIT_REPO], required=("model.pt", "net_ema.pt"))

    with pytest.raises(hub.DownloadError, match=r"has no net_ema\.pt"):
        hub.download_repo(spec, ckpt)

    assert fake_hub.file_gets() == []


def test_listed_file_that_cannot_be_fetched_is_named(fake_hub, ckpt):
    fake_hub.hide(f"{TOKENIZER_REPO}/decoder.jit")

    with pytest.raises(hub.DownloadError, match=r"decoder\.jit is listed but cannot be downloaded \(HTTP 404\)"):
        hub.download_repo(TOKENIZER_REPO, ckpt)


# ---- offline ---------------------------------------------------------------------------------------------------


def test_offline_accepts_a_complete_verified_copy_without_requests(fake_hub, ckpt, monkeypatch):
    from huggingface_hub import constants

    hub.download_all(ckpt)
    (ckpt / "google-t5/t5-11b" / hub.MANIFEST_NAME).unlink()  # as after Snakemake removed the output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.reset()

    manifests = hub.download_all(ckpt)

    assert fake_hub.requests() == [] and all(m.is_file() for m in manifests)


def test_offline_with_incomplete_copy_is_a_clear_error(fake_hub, ckpt, monkeypatch):
    from huggingface_hub import constants

    hub.download_repo(TOKENIZER_REPO, ckpt)
    (hub.local_dir_for(ckpt, TOKENIZER_REPO) / "decoder.jit").unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.reset()

    with pytest.raises(hub.DownloadError, match=r"HF_HUB_OFFLINE=1 .*decoder\.jit is missing.*unset HF_HUB_OFFLINE"):
        hub.download_repo(TOKENIZER_REPO, ckpt)
    with pytest.raises(hub.DownloadError, match=r"HF_HUB_OFFLINE=1 .*no verified copy of google-t5/t5-11b"):
        hub.download_repo(T5_REPO, ckpt)
    assert fake_hub.requests() == []


# ---- CLI -------------------------------------------------------------------------------------------------------


def _cli():
    spec = importlib.util.spec_from_file_location("download_cli", ROOT / "src" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_downloads_and_copies_manifests(fake_hub, ckpt, tmp_path):
    outs = [tmp_path / "m" / "tok.json", tmp_path / "m" / "t5.json"]
    argv = ["--checkpoint-dir", str(ckpt), "--source", "hf", "--repo", TOKENIZER_REPO, "--repo", T5_REPO]

    assert _cli().main([*argv, "--manifest-out", *map(str, outs)]) == 0

    assert json.loads(outs[0].read_text())["repo_id"] == TOKENIZER_REPO
    assert outs[1].read_text() == (ckpt / "google-t5/t5-11b" / hub.MANIFEST_NAME).read_text()


def test_cli_error_exits_1_with_one_line(fake_hub, tmp_path):
    """In a fresh process, configured only through the environment as a user would."""
    fake_hub.gate(DIT_REPO, "hf_granted")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_ENDPOINT=fake_hub.endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    cmd = [sys.executable, str(ROOT / "src" / "download.py"), "--checkpoint-dir", str(tmp_path / "c")]
    proc = subprocess.run([*cmd, "--source", "hf", "--repo", DIT_REPO], env=env, capture_output=True, text=True)

    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "license" in errors[0] and "HF_TOKEN" in errors[0]
    assert any(r.path.startswith(f"/{DIT_REPO}/resolve/") for r in fake_hub.requests())  # it did reach the fake

    fake_hub.reset()
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([*cmd, "--source", "hf"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: HF_HUB_OFFLINE=1 but ")
    assert fake_hub.requests() == []


def test_cli_tiny_builds_assets_and_writes_manifests(ckpt, monkeypatch):
    def build_tiny_assets(checkpoint_dir: Path, seed: int, repos: list[str]) -> None:
        for spec in map(hub.REPOS.get, repos):
            (checkpoint_dir / spec.subdir).mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / spec.subdir / "weights.bin").write_bytes(b"seed %d" % seed)

    monkeypatch.setitem(sys.modules, "mvdit.tiny.assets", types.SimpleNamespace(build_tiny_assets=build_tiny_assets))

    assert _cli().main(["--checkpoint-dir", str(ckpt), "--source", "tiny", "--seed", "7"]) == 0

    for subdir, (repo_id, _) in EXPECTED.items():
        m = _manifest(ckpt, subdir)
        assert (m["repo_id"], m["source"], m["commit"]) == (repo_id, "tiny", None)
        assert m["files"] == [{"path": "weights.bin", "size": 6, "sha256": hashlib.sha256(b"seed 7").hexdigest()}]


def test_git_blob_ids_of_regular_files_are_checked(fake_hub, ckpt):
    """Regular files have no sha256 on the Hub; the git blob id is what proves their content."""
    data = fake_hub.repos[TOKENIZER_REPO].files["config.json"]
    assert hub.file_digests(_write(ckpt / "x", data), git_sha1=True)["git_sha1"] == git_blob_sha1(data)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_too_little_disk_space_fails_before_transfer(fake_hub, ckpt, monkeypatch):
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))

    with pytest.raises(hub.DownloadError, match=r"needs 0\.0 GB free .* only 0\.0 GB available"):
        hub.download_repo(DIT_REPO, ckpt)

    assert fake_hub.file_gets() == []


def test_orphaned_partial_downloads_are_removed(fake_hub, ckpt):
    folder = hub.local_dir_for(ckpt, DIT_REPO) / ".cache" / "huggingface" / "download"
    old, fresh = _write(folder / "a.1234.incomplete", b"x" * 10), _write(folder / "b.5678.incomplete", b"y")
    os.utime(old, (0, 0))  # a killed process's leftover; the fresh one may belong to a live download

    hub.download_repo(DIT_REPO, ckpt)

    assert not old.exists() and fresh.exists()


def test_unknown_revision_is_a_clear_error(fake_hub, ckpt):
    with pytest.raises(hub.DownloadError, match=r"no such revision .*v9.*--revision"):
        hub.download_repo(DIT_REPO, ckpt, revision="v9")


def test_pinned_commit_is_recorded_and_reused(fake_hub, ckpt):
    sha = fake_hub.repos[DIT_REPO].sha
    manifest = json.loads(hub.download_repo(DIT_REPO, ckpt, revision=sha).read_text())
    assert manifest["revision"] == manifest["commit"] == sha
    fake_hub.reset()

    hub.download_repo(DIT_REPO, ckpt, revision=sha)

    assert fake_hub.requests() == []


def test_sigkill_mid_download_then_rerun_completes_and_verifies(fake_hub, ckpt):
    """A download killed with SIGKILL mid-transfer leaves no manifest (the rule's output); the rerun finishes."""
    import multiprocessing
    import os
    import signal
    import time

    key = f"{DIT_REPO}/model.pt"
    fake_hub.slow(key, 0.5)
    child = multiprocessing.get_context("fork").Process(target=hub.download_all, args=(ckpt,))
    child.start()
    deadline = time.time() + 30
    while not fake_hub.file_gets(key) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.6)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert not (ckpt / hub.REPOS[DIT_REPO].subdir / hub.MANIFEST_NAME).exists()
    fake_hub.reset()
    manifests = hub.download_all(ckpt)
    assert len(manifests) == 3
    data = (ckpt / hub.REPOS[DIT_REPO].subdir / "model.pt").read_bytes()
    assert data == fake_hub.repos[DIT_REPO].files["model.pt"]
