"""Experiment YAML files: strict JSON-schema validation with defaults, plus the cross-field checks a schema cannot
express. Every problem is one line naming the file, the key and the fix. Snakemake and every script use this.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import numpy as np
import yaml

from mvdit.config import get_preset
from mvdit.constants import CAMERAS, DIT_REPO, SPATIAL_COMPRESSION, T5_REPO, TEMPORAL_COMPRESSION, TOKENIZER_REPO

SCHEMA_PATH = Path(__file__).with_name("experiment.schema.yaml")


class ExperimentError(ValueError):
    """An invalid experiment; the message is one line naming the file and key."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(validator_cls):
    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate(config: dict, source: str = "<config>") -> dict:
    """Validate in place (filling defaults) and return the config; raises ExperimentError (one line)."""
    if not isinstance(config, dict):
        raise ExperimentError(f"{source}: an experiment must be a YAML mapping, got {type(config).__name__}")
    errors = sorted(_Validator(load_schema()).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        if e.validator == "additionalProperties":
            extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            where = _key(e.absolute_path)
            prefix = "" if where == "<top level>" else where + "."
            allowed = ", ".join(sorted(e.schema.get("properties", {})))
            raise ExperimentError(f"{source}: unknown key {prefix}{extra[0]} (allowed here: {allowed})")
        more = f" (+{len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ExperimentError(f"{source}: {_key(e.absolute_path)}: {e.message}{more}")
    check_combinations(config, source)
    return config


def check_combinations(cfg: dict, source: str) -> None:
    """Cross-field rules (the schema checks each field alone)."""
    d, t, i = cfg["data"], cfg["train"], cfg["infer"]

    def fail(key: str, msg: str) -> None:
        raise ExperimentError(f"{source}: {key}: {msg}")

    step = SPATIAL_COMPRESSION * 2  # tokenizer 8x, then 2x2 patches
    for k in ("height", "width"):
        if d[k] % step:
            fail(
                f"data.{k}",
                f"{d[k]} is not divisible by {step} (tokenizer 8x times patch 2); use e.g. {d[k] // step * step}",
            )
    if (d["num_frames"] - 1) % TEMPORAL_COMPRESSION:
        n = d["num_frames"]
        fail("data.num_frames", f"{n} is not 1 + 8k (the causal tokenizer's chunk); use {(n - 1) // 8 * 8 + 1}")
    latent_t = 1 + (d["num_frames"] - 1) // TEMPORAL_COMPRESSION
    if t["max_cond_frames"] > latent_t:
        fail("train.max_cond_frames", f"{t['max_cond_frames']} exceeds the {latent_t} latent frames per view")
    if i["num_input_frames"] > d["num_frames"]:
        fail("infer.num_input_frames", f"{i['num_input_frames']} exceeds data.num_frames={d['num_frames']}")
    try:
        net = get_preset(cfg["model"]["preset"], **cfg["model"]["overrides"])
    except TypeError as e:
        fail("model.overrides", f"{e}")
    if len(d["cameras"]) > net.n_views:
        fail("data.cameras", f"{len(d['cameras'])} views but the model has {net.n_views} view embeddings")
    if d["source"] == "real" and not d.get("root"):
        fail("data.root", "data.source is real, so data.root must name the dataset directory")
    if d["source"] != "mock" and d["held_out"] >= d["num_clips"] and d["source"] == "synthetic":
        fail("data.held_out", f"{d['held_out']} held-out clips leave none of the {d['num_clips']} to train on")
    if t["save_iter"] > t["iterations"]:
        fail("train.save_iter", f"{t['save_iter']} is larger than train.iterations={t['iterations']}")
    if t["sharding"] == "hybrid" and t["nodes"] * t["nproc"] % t["shard_group_size"]:
        fail("train.shard_group_size", "must divide the total process count (nodes x nproc) for hybrid sharding")
    nodes = cfg["resources"].get("train", {}).get("nodes")
    if nodes and nodes != t["nodes"]:
        fail("resources.train.nodes", f"{nodes} nodes but train.nodes={t['nodes']}; make them equal")
    gpus = cfg["resources"].get("train", {}).get("gpus")
    if gpus and gpus != t["nproc"]:
        fail("resources.train.gpus", f"{gpus} GPUs per node but train.nproc={t['nproc']} processes; make them equal")
    heads = net.num_heads
    if i["nproc"] > 1 and i["context_parallel"] == "ulysses" and heads % i["nproc"]:
        fail(
            "infer.context_parallel",
            f"ulysses needs infer.nproc={i['nproc']} to divide the model's {heads} heads; use allgather or auto",
        )
    gpus = cfg["resources"].get("infer", {}).get("gpus")
    if i["nproc"] > 1 and gpus and gpus > 1:
        fail(
            "resources.infer.gpus",
            f"{gpus} GPUs per process with infer.nproc={i['nproc']}: with context parallelism it counts the GPUs of "
            "one process (1); the infer jobs ask for gpus x nproc",
        )


def load_experiment(path: str | Path) -> dict:
    """Read, validate and default an experiment YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ExperimentError(f"{path}: cannot read the experiment file ({e.strerror})") from e
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ExperimentError(f"{path}:{where}: malformed YAML ({problem}); fix the syntax there") from e
    return validate(cfg, str(path))


def repo_dir(cfg: dict, repo: str) -> Path:
    """checkpoints/<repo name> as upstream lays it out (google-t5/t5-11b keeps its org folder)."""
    name = repo if repo == T5_REPO else repo.split("/", 1)[1]
    return Path(cfg["checkpoint_dir"]) / name


def dit_dir(cfg: dict) -> Path:
    return repo_dir(cfg, DIT_REPO)


def tokenizer_dir(cfg: dict) -> Path:
    return repo_dir(cfg, TOKENIZER_REPO)


def t5_dir(cfg: dict) -> Path:
    return repo_dir(cfg, T5_REPO)


def post_trained_dir(cfg: dict) -> Path:
    """Where the copy rule puts the EMA weights (upstream doc: <ckpt dir>/<name>_post-trained/model.pt)."""
    return Path(cfg["checkpoint_dir"]) / f"{dit_dir(cfg).name}_post-trained"


def camera_indices(cfg: dict) -> list[int]:
    return [CAMERAS.index(c) for c in cfg["data"]["cameras"]]


def lr_multiplier(step: int, warmup_steps: int, f_start: float) -> float:
    """Upstream's LambdaLinearScheduler with f_max = f_min = 1: linear warm-up from f_start, then 1."""
    if warmup_steps and step < warmup_steps:
        return f_start + (1.0 - f_start) * step / warmup_steps
    return 1.0


def ema_gamma(rate: float) -> float:
    """EDM2 power-EMA exponent: the largest real root of x^3 + 7x^2 + (16 - s^-2) x + (12 - s^-2)."""
    s2 = rate**-2
    roots = np.roots([1, 7, 16 - s2, 12 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_beta(it: int, gamma: float) -> float:
    """Decay after step `it` (0-based): 0 at it = 0 (the EMA becomes the weights), then (1 - 1/(it+1))^(gamma+1)."""
    return 0.0 if it == 0 else (1 - 1 / (it + 1)) ** (gamma + 1)


def main(argv: list[str] | None = None) -> int:
    """python -m mvdit.experiment FILE...: validate experiment files (exit 1 with one line per bad file)."""
    import sys

    bad = 0
    for path in argv if argv is not None else sys.argv[1:]:
        try:
            load_experiment(path)
            print(f"{path}: ok")
        except ExperimentError as e:
            print(f"error: {e}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
