"""Fetch the checkpoints into `<checkpoint-dir>/<repo name>/` and write a `.mvdit_manifest.json` per repo.

`--source hf` downloads and verifies the Hub repos (HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE apply);
`--source tiny` builds the tiny stand-in assets in the same layout instead.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from mvdit.assets.hub import REPOS, DownloadError, download_repo, write_local_manifest

log = logging.getLogger("download")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"), help="root of the checkpoint layout")
    p.add_argument("--source", choices=("hf", "tiny"), required=True, help="the Hub, or tiny built stand-ins")
    p.add_argument(
        "--repo", action="append", choices=list(REPOS), help="repo to fetch (repeatable; default: all three)"
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit for every --repo (default: main)")
    p.add_argument(
        "--manifest-out",
        type=Path,
        nargs="+",
        default=None,
        help="also copy each repo's manifest here, one path per repo in --repo order",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny assets (--source tiny)")
    p.add_argument("--attempts", type=int, default=3, help="tries per Hub call on transient network errors")
    args = p.parse_args(argv)
    args.repo = args.repo or list(REPOS)
    if args.manifest_out is not None and len(args.manifest_out) != len(args.repo):
        p.error(f"--manifest-out needs {len(args.repo)} paths (one per repo), got {len(args.manifest_out)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # INFO for our own steps only: the HTTP client would log every request at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("mvdit", "download"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        if args.source == "tiny":
            from mvdit.tiny.assets import build_tiny_assets  # imported here: the Hub path must not need torch

            build_tiny_assets(args.checkpoint_dir, args.seed, repos=args.repo)
            manifests = [write_local_manifest(args.checkpoint_dir, r, source="tiny") for r in args.repo]
        else:
            manifests = [
                download_repo(r, args.checkpoint_dir, revision=args.revision, attempts=args.attempts) for r in args.repo
            ]
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for src, dst in zip(manifests, args.manifest_out or [], strict=False):
        if src.resolve() != dst.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)  # atomic, like the manifest itself
    for m in manifests:
        log.info("ok: %s", m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
