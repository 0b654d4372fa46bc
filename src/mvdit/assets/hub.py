"""Download the Hub checkpoints (DiT, video tokenizer, T5-11B) into upstream's `checkpoints/<repo name>` layout.

Transfers, resume, auth and offline mode are huggingface_hub's; we add what it lacks: streamed content verification
against the Hub's hashes and upstream's MD5 table, a completion manifest, bounded retries and one-line errors.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled
from tqdm.auto import tqdm

from mvdit.constants import DIT_REPO, REPO_SUBDIRS, T5_REPO, TOKENIZER_REPO

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_NAME = ".mvdit_manifest.json"
# A copy of the manifest that Snakemake does not own: it survives Snakemake deleting the rule's output before a
# rerun, so an offline rerun can still verify the local copy.
RECORD_PATH = Path(".cache") / "mvdit" / "verified.json"
MANIFEST_FORMAT = 1

ATTEMPTS = 3  # calls into the library per step; it already retries cut transfers inside one call
RETRY_BACKOFF_S = 5.0  # doubled after each failed attempt
HASH_CHUNK = 8 * 1024 * 1024
ORPHAN_AGE_S = 3600.0  # `.incomplete` files untouched this long belong to a killed process, never to a live one


class DownloadError(RuntimeError):
    """A download that failed; the message is one line naming the cause and the fix."""


@dataclass(frozen=True)
class RepoSpec:
    """What we take from one Hub repo and where it goes under the checkpoint dir."""

    repo_id: str
    subdir: str  # relative to the checkpoint dir
    required: tuple[str, ...]  # exact paths; the download fails if the repo lacks one
    optional: tuple[str, ...] = ()  # glob patterns, fetched when the repo has matching files
    weights: tuple[tuple[str, ...], ...] = ()  # alternative weight formats (globs); the first one present wins
    md5: Mapping[str, str] = field(default_factory=dict)  # known checksums of the released files (upstream's table)

    def selection(self) -> dict:
        return {
            "required": list(self.required),
            "optional": list(self.optional),
            "weights": [list(w) for w in self.weights],
        }


# Upstream's allow_patterns for the DiT minus guardrail/*; only inference/training files for the other two
# (upstream takes both whole, incl. the ~45 GB tf_model.h5). MD5s: training.md §7 (upstream's pre-check table).
REPOS: dict[str, RepoSpec] = {
    DIT_REPO: RepoSpec(
        DIT_REPO,
        REPO_SUBDIRS[DIT_REPO],
        required=("model.pt",),
        optional=("config.json", "README.md", "mean_std.pt", "*.jit"),
        md5={"model.pt": "1653f87dce3d558ee01416593552a91c"},
    ),
    TOKENIZER_REPO: RepoSpec(
        TOKENIZER_REPO,
        REPO_SUBDIRS[TOKENIZER_REPO],
        required=("encoder.jit", "decoder.jit", "mean_std.pt"),
        optional=("config.json",),
        md5={"mean_std.pt": "f07680ad7eefae57d698778e2a0c7c96"},
    ),
    T5_REPO: RepoSpec(
        T5_REPO,
        REPO_SUBDIRS[T5_REPO],
        required=("config.json", "spiece.model"),
        optional=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
        # pytorch_model.bin first: it is what upstream's MD5 table pins, and taking both formats would add ~45 GB.
        weights=(
            ("pytorch_model.bin",),
            ("pytorch_model-*.bin", "pytorch_model.bin.index.json"),
            ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json"),
        ),
        md5={"pytorch_model.bin": "f890878d8a162e0045a25196e27089a3"},
    ),
}


@dataclass(frozen=True)
class RemoteFile:
    """The Hub's metadata for one file: LFS files carry a sha256, regular files only their git blob id."""

    path: str
    size: int
    sha256: str | None
    git_sha1: str | None


# ---- public entry points ---------------------------------------------------------------------------------------


def local_dir_for(checkpoint_dir: Path | str, repo: RepoSpec | str) -> Path:
    return Path(checkpoint_dir) / _spec(repo).subdir


def download_all(
    checkpoint_dir: Path | str, repo_ids: Iterable[str] | None = None, *, revision: str | None = None, **kwargs
) -> list[Path]:
    """Download (or verify) each repo of `REPOS` (all by default); returns the manifest paths in order."""
    return [download_repo(r, checkpoint_dir, revision=revision, **kwargs) for r in (repo_ids or list(REPOS))]


def download_repo(
    repo: RepoSpec | str,
    checkpoint_dir: Path | str,
    *,
    revision: str | None = None,
    token: str | None = None,
    attempts: int | None = None,
    backoff_s: float | None = None,
    max_workers: int = 8,
) -> Path:
    """Make `<checkpoint_dir>/<subdir>` hold the verified files of one repo; returns its manifest path.

    Skips the network when a previous verified download is intact. `token=None` lets the library use HF_TOKEN or
    the stored login; HF_ENDPOINT and HF_HUB_OFFLINE are likewise left to the library. Raises DownloadError.
    """
    spec = _spec(repo)
    local = local_dir_for(checkpoint_dir, spec)
    requested = revision or constants.DEFAULT_REVISION
    attempts = max(1, ATTEMPTS if attempts is None else attempts)
    backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
    digests = _DigestCache()

    previous, problem = _previous_download(local, spec, requested, digests)
    if previous is not None:
        log.info("%s: verified local copy in %s, nothing to download", spec.repo_id, local)
        return _publish(local, previous)
    if constants.HF_HUB_OFFLINE:
        raise DownloadError(
            f"HF_HUB_OFFLINE=1 but {local} holds no verified copy of {spec.repo_id} ({problem}); "
            "unset HF_HUB_OFFLINE to download it, or copy a complete checkpoint dir with its manifest here"
        )

    def step(what: str, fn: Callable[[], T], path: str | None = None) -> T:
        return _call(spec, local, what, fn, attempts, backoff_s, path)

    commit, remote = step("list files", lambda: _list_remote(spec.repo_id, requested, token))
    wanted = select_files(spec, remote, commit)

    if all((local / p).is_file() for p in wanted) and not _failures(local, spec, remote, wanted, digests):
        log.info("%s: local files match commit %s, nothing to download", spec.repo_id, commit[:12])
    else:
        _remove_orphans(local)
        _check_free_space(spec, local, sum(remote[p].size for p in wanted if not _has_size(local / p, remote[p].size)))
        log.info("%s: downloading %d files of commit %s into %s", spec.repo_id, len(wanted), commit[:12], local)
        step("download", lambda: _snapshot(spec.repo_id, commit, local, wanted, token, max_workers))
        for path, reason in _failures(local, spec, remote, wanted, digests).items():
            # The client trusts its own metadata over the bytes (spec §4), so refetch explicitly.
            log.warning("%s: %s failed verification (%s); fetching it again", spec.repo_id, path, reason)
            (local / path).unlink(missing_ok=True)
            step("re-download", lambda p=path: _refetch(spec.repo_id, commit, local, p, token), path)
            if again := _failures(local, spec, remote, [path], digests):
                (local / path).unlink(missing_ok=True)
                raise DownloadError(
                    f"{spec.repo_id}: {path} is corrupt after a fresh download ({again[path]}); "
                    "check disk space and the network path (proxy/mirror at HF_ENDPOINT), then rerun"
                )

    entries = [_manifest_entry(local, p, spec, digests) for p in wanted]
    return _publish(local, _manifest(spec, requested, commit, "hf", entries))


def write_local_manifest(
    checkpoint_dir: Path | str, repo: RepoSpec | str, *, source: str, revision: str | None = None
) -> Path:
    """Manifest for files already placed under the repo's dir by other means (e.g. the tiny stand-ins).

    Lists every file there; no Hub metadata or MD5 pins apply, the sha256 records what was built.
    """
    spec = _spec(repo)
    local = local_dir_for(checkpoint_dir, spec)
    files = sorted(
        p.relative_to(local).as_posix()
        for p in local.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and ".cache" not in p.relative_to(local).parts
    )
    if not files:
        raise DownloadError(f"{spec.repo_id}: no files under {local} to write a manifest for")
    digests = _DigestCache()
    entries = [_manifest_entry(local, p, None, digests) for p in files]
    return _publish(local, _manifest(spec, revision or source, None, source, entries))


def select_files(spec: RepoSpec, remote: Mapping[str, RemoteFile], commit: str = "?") -> list[str]:
    """The repo paths we fetch: the required ones, the optional ones present, and one weight format."""
    names = sorted(remote)
    missing = [p for p in spec.required if p not in remote]
    if missing:
        raise DownloadError(
            f"{spec.repo_id} at commit {commit[:12]} has no {', '.join(missing)}; "
            "check --revision, or update the file table in mvdit/assets/hub.py if the repo was reorganised"
        )
    wanted = set(spec.required)
    wanted.update(p for p in names if any(_matches(p, g) for g in spec.optional))
    for group in spec.weights:
        found = [p for p in names if any(_matches(p, g) for g in group)]
        if found:
            wanted.update(found)
            break
    else:
        if spec.weights:
            formats = " or ".join("+".join(g) for g in spec.weights)
            raise DownloadError(f"{spec.repo_id} at commit {commit[:12]} has no PyTorch weights ({formats})")
    return sorted(wanted)


def _matches(path: str, pattern: str) -> bool:
    # fnmatch's "*" crosses "/", so "*.jit" would also take guardrail/*.jit; keep globs within their folder.
    return path.count("/") == pattern.count("/") and fnmatch.fnmatchcase(path, pattern)


def file_digests(path: Path, *, md5: bool = False, git_sha1: bool = False) -> dict[str, str]:
    """sha256 (plus md5 / git blob sha1 on request) of a file, read in chunks in one pass."""
    size = path.stat().st_size
    hashers = {"sha256": hashlib.sha256()}
    if md5:
        hashers["md5"] = hashlib.md5(usedforsecurity=False)
    if git_sha1:
        hashers["git_sha1"] = hashlib.sha1(b"blob %d\0" % size)
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with path.open("rb") as f, _hash_progress(path, size) as bar:
        while n := f.readinto(buf):
            for h in hashers.values():
                h.update(view[:n])
            bar.update(n)
    return {name: h.hexdigest() for name, h in hashers.items()}


def read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


# ---- verification ---------------------------------------------------------------------------------------------


class _DigestCache:
    """Hashes per (path, size, mtime) so a file is read once per run even when checked twice."""

    def __init__(self) -> None:
        self._seen: dict[tuple, dict[str, str]] = {}

    def get(self, path: Path, *, md5: bool = False, git_sha1: bool = False) -> dict[str, str]:
        # md5 and git sha1 only where needed: each extra hash costs ~a minute on the 45 GB T5 file.
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        have = self._seen.get(key, {})
        if not have or (md5 and "md5" not in have) or (git_sha1 and "git_sha1" not in have):
            have = file_digests(path, md5=md5 or "md5" in have, git_sha1=git_sha1 or "git_sha1" in have)
            self._seen[key] = have
        return have


def _failures(
    local: Path, spec: RepoSpec, remote: Mapping[str, RemoteFile], paths: Iterable[str], digests: _DigestCache
) -> dict[str, str]:
    """Path -> reason for each file that is missing or differs from the Hub's metadata."""
    out = {}
    for p in paths:
        file, want = local / p, remote[p]
        if not file.is_file():
            out[p] = "missing"
        elif file.stat().st_size != want.size:
            out[p] = f"size {file.stat().st_size} B, expected {want.size} B"
        else:
            d = digests.get(file, md5=p in spec.md5, git_sha1=want.sha256 is None)
            if want.sha256 is not None and d["sha256"] != want.sha256:
                out[p] = f"sha256 {d['sha256']}, expected {want.sha256}"
            elif want.sha256 is None and want.git_sha1 and d["git_sha1"] != want.git_sha1:
                out[p] = f"git blob sha1 {d['git_sha1']}, expected {want.git_sha1}"
            else:
                _check_md5(spec, p, d)
    return out


def _check_md5(spec: RepoSpec, path: str, digests: Mapping[str, str]) -> None:
    # Reached only for bytes that match the Hub's own hash, so a refetch would not help: the repo itself changed.
    want, got = spec.md5.get(path), digests.get("md5")
    if want is not None and got != want:
        raise DownloadError(
            f"{spec.repo_id}: {path} has md5 {got}, expected {want} (upstream's released file) although it matches "
            "the Hub; the repo changed since the release: pass --revision <release commit> or update the MD5 table"
        )


def _previous_download(local: Path, spec: RepoSpec, requested: str, digests: _DigestCache) -> tuple[dict | None, str]:
    """A manifest (or its record copy) whose files are all intact, or None and why not."""
    problem = "no manifest"
    for candidate in (local / MANIFEST_NAME, local / RECORD_PATH):
        manifest = read_manifest(candidate)
        if manifest is None:
            continue
        if manifest.get("source") != "hf" or manifest.get("repo_id") != spec.repo_id:
            problem = f"{candidate.name} is not from a Hub download of {spec.repo_id}"
        elif requested not in (manifest.get("revision"), manifest.get("commit")):
            problem = f"{candidate.name} is for revision {manifest.get('revision')}, not {requested}"
        elif manifest.get("selection") != spec.selection():
            problem = f"{candidate.name} was made for a different file selection"
        elif bad := _manifest_failures(local, spec, manifest, digests):
            problem = bad
        else:
            return manifest, ""
    return None, problem


def _manifest_failures(local: Path, spec: RepoSpec, manifest: dict, digests: _DigestCache) -> str:
    """Empty when every listed file is present with its recorded size and sha256, else the first problem."""
    for entry in manifest.get("files", []):
        file = local / entry["path"]
        if not file.is_file():
            return f"{entry['path']} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{entry['path']} has size {file.stat().st_size} B, expected {entry['size']} B"
        d = digests.get(file, md5=entry["path"] in spec.md5)
        if d["sha256"] != entry["sha256"]:
            return f"{entry['path']} does not match its recorded sha256"
        _check_md5(spec, entry["path"], d)
    return ""


# ---- manifest -------------------------------------------------------------------------------------------------


def _manifest_entry(local: Path, path: str, spec: RepoSpec | None, digests: _DigestCache) -> dict:
    pinned = spec is not None and path in spec.md5
    d = digests.get(local / path, md5=pinned)
    entry = {"path": path, "size": (local / path).stat().st_size, "sha256": d["sha256"]}
    if pinned:
        entry["md5"] = d["md5"]
    return entry


def _manifest(spec: RepoSpec, revision: str, commit: str | None, source: str, entries: list[dict]) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "repo_id": spec.repo_id,
        "source": source,
        "revision": revision,
        "commit": commit,
        "endpoint": constants.ENDPOINT if source == "hf" else None,
        "selection": spec.selection(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_size": sum(e["size"] for e in entries),
        "files": entries,
    }


def _publish(local: Path, manifest: dict) -> Path:
    """Write the record copy, then the manifest (last: it is the completion marker); returns the manifest path."""
    for path in (local / RECORD_PATH, local / MANIFEST_NAME):
        if read_manifest(path) != manifest:
            _write_json_atomic(path, manifest)
    return local / MANIFEST_NAME


def _write_json_atomic(path: Path, data: dict) -> None:
    # Snakemake treats the manifest as proof of a complete download, so it must never exist half-written.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---- library calls, retries and error mapping ------------------------------------------------------------------


def _list_remote(repo_id: str, revision: str, token: str | None) -> tuple[str, dict[str, RemoteFile]]:
    info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True)
    remote = {}
    for s in info.siblings or []:
        size = s.lfs.size if s.lfs is not None else s.size
        sha = s.lfs.sha256 if s.lfs is not None else None
        remote[s.rfilename] = RemoteFile(s.rfilename, int(size or 0), sha, s.blob_id if s.lfs is None else None)
    return info.sha, remote


def _snapshot(repo_id: str, commit: str, local: Path, wanted: list[str], token: str | None, workers: int) -> None:
    # Pinning the commit (not the branch) keeps every file of one download at one revision.
    snapshot_download(
        repo_id, revision=commit, local_dir=local, allow_patterns=wanted, token=token, max_workers=workers
    )


def _refetch(repo_id: str, commit: str, local: Path, path: str, token: str | None) -> None:
    hf_hub_download(repo_id, path, revision=commit, local_dir=local, token=token, force_download=True)


def _call(
    spec: RepoSpec, local: Path, what: str, fn: Callable[[], T], attempts: int, backoff_s: float, path: str | None
) -> T:
    """Run one library call with bounded retries on transient errors; map failures to DownloadError."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except DownloadError:
            raise
        except Exception as exc:
            if not _is_transient(exc):
                raise DownloadError(_explain(exc, spec, local, path)) from exc
            if attempt == attempts:
                raise DownloadError(
                    f"{spec.repo_id}: network failure during {what} after {attempts} attempts "
                    f"({_one_line(exc)}); check the connection, proxy and HF_ENDPOINT, then rerun "
                    "(finished files are kept)"
                ) from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "%s: %s failed (%s); retry %d/%d in %.0f s",
                *(spec.repo_id, what, _one_line(exc), attempt, attempts - 1, delay),
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 2.x talks httpx2 (1.x httpx); their transport errors escape the library unwrapped (spec P10).
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors() + (ConnectionError, TimeoutError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, LocalEntryNotFoundError):
        return not constants.HF_HUB_OFFLINE  # online, the library raises it when the Hub cannot be reached
    if isinstance(exc, EntryNotFoundError):
        return False
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status in (408, 429) or status >= 500
    if isinstance(exc, _TRANSPORT_ERRORS):
        return True
    # The size check after a short transfer raises a plain OSError; a fresh attempt usually fixes it.
    return isinstance(exc, OSError) and "Consistency check failed" in str(exc)


def _explain(exc: BaseException, spec: RepoSpec, local: Path, path: str | None) -> str:
    repo, status = spec.repo_id, _status(exc)
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo} is gated ({status}): log in at https://huggingface.co/{repo}, accept its license, then set "
            "HF_TOKEN to a read token of that account or run `hf auth login`"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"{repo} not found at {constants.ENDPOINT} ({status}): check the repo id and HF_ENDPOINT; a private repo "
            "or an invalid HF_TOKEN looks the same, so check the token (`hf auth whoami`)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo} has no such revision ({status}: {getattr(exc, 'server_message', None)}): check --revision"
    if isinstance(exc, LocalEntryNotFoundError):
        return f"HF_HUB_OFFLINE=1 and no complete local copy of {repo} in {local}; unset HF_HUB_OFFLINE to download it"
    if isinstance(exc, EntryNotFoundError):
        name = path or _url_tail(exc) or "a file"
        return f"{repo}: {name} is listed but cannot be downloaded ({status}); the repo may be mid-update, rerun later"
    if isinstance(exc, HfHubHTTPError):
        # The real Hub answers 401 to an invalid or expired token, without an error code.
        hint = "; check HF_TOKEN or run `hf auth login`" if status in ("HTTP 401", "HTTP 403") else ""
        return f"{repo}: the Hub refused the request ({_one_line(exc)}){hint}"
    if isinstance(exc, OSError):
        return f"{repo}: cannot write into {local} ({_one_line(exc)}); check free space and permissions"
    return f"{repo}: download failed ({_one_line(exc)})"


def _status(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(exc).__name__


def _url_tail(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    url = str(response.url) if response is not None else ""
    return url.split("/resolve/", 1)[1].split("/", 1)[-1] if "/resolve/" in url else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


# ---- small helpers --------------------------------------------------------------------------------------------


def _spec(repo: RepoSpec | str) -> RepoSpec:
    if isinstance(repo, RepoSpec):
        return repo
    if repo not in REPOS:
        raise DownloadError(f"unknown repo {repo!r}; known: {', '.join(REPOS)}")
    return REPOS[repo]


def _has_size(file: Path, size: int) -> bool:
    return file.is_file() and file.stat().st_size == size


def _check_free_space(spec: RepoSpec, local: Path, needed: int) -> None:
    # Fail before a multi-GB transfer rather than at its end (the library only warns).
    probe = local
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DownloadError(
            f"{spec.repo_id}: needs {needed / 1e9:.1f} GB free in {local}, only {free / 1e9:.1f} GB available; "
            "free space or pass another --checkpoint-dir"
        )


def _remove_orphans(local: Path) -> None:
    # A killed download leaves `<etag>.<id>.incomplete` behind; the library never reuses or deletes it (spec §3).
    folder = local / ".cache" / "huggingface" / "download"
    if not folder.is_dir():
        return
    for f in folder.rglob("*.incomplete"):
        if time.time() - f.stat().st_mtime > ORPHAN_AGE_S:
            log.info("removing orphaned partial download %s (%d B)", f, f.stat().st_size)
            f.unlink(missing_ok=True)


def _hash_progress(path: Path, size: int):
    # Hashing the 45 GB T5 file takes minutes: show it like the library shows transfers.
    quiet = size < 256 * 1024 * 1024 or are_progress_bars_disabled()
    return tqdm(total=size, unit="B", unit_scale=True, desc=f"verify {path.name}", disable=quiet, leave=False)
