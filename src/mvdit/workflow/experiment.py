"""Experiment YAML files: strict JSON-schema validation with defaults, plus the cross-field checks a schema cannot
express. Every problem is one line naming the file, the key and the fix. Snakemake and every script use this.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from mvdit.constants import (
    CAMERAS,
    DIT_REPO,
    REPO_SUBDIRS,
    SPATIAL_COMPRESSION,
    T5_REPO,
    TEMPORAL_COMPRESSION,
    TOKENIZER_REPO,
    latent_frames,
)
from mvdit.model.config import NetConfig, get_preset

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


# keys that moved: the old place is an error naming the new one
MOVED = {("model", "compat"): "infer.compat"}


def validate(config: dict, source: str = "<config>") -> dict:
    """Validate in place (filling defaults) and return the config; raises ExperimentError (one line)."""
    if not isinstance(config, dict):
        raise ExperimentError(f"{source}: an experiment must be a YAML mapping, got {type(config).__name__}")
    for (section, key), new in MOVED.items():
        if isinstance(config.get(section), dict) and key in config[section]:
            raise ExperimentError(f"{source}: {section}.{key} has moved to {new}; move the line there")
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
    latent_t = latent_frames(d["num_frames"])
    if t["max_cond_frames"] > latent_t:
        fail("train.max_cond_frames", f"{t['max_cond_frames']} exceeds the {latent_t} latent frames per view")
    if t["min_cond_frames"] > t["max_cond_frames"]:
        fail("train.min_cond_frames", f"{t['min_cond_frames']} exceeds train.max_cond_frames={t['max_cond_frames']}")
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
    e = cfg["export"]
    if e["iteration"] != "last":
        saved = sorted({*range(t["save_iter"], t["iterations"] + 1, t["save_iter"]), t["iterations"]})
        if e["iteration"] not in saved:
            near = ", ".join(str(n) for n in saved[:3]) + (f", ..., {saved[-1]}" if len(saved) > 3 else "")
            fail("export.iteration", f"{e['iteration']} is not an iteration training saves (last, or one of {near})")
    if e["upstream_layout"] and i["checkpoint"] != POST_TRAINED:
        fail("export.upstream_layout", f"exports this experiment's training, but infer.checkpoint is {i['checkpoint']}")
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


def check_files(exp: Experiment) -> None:
    """The files a user brings (a checkpoint to sample from or start training from, an adapter) must exist."""
    brought = {"infer.checkpoint": exp.infer.checkpoint, "infer.adapter": exp.infer.adapter}
    if exp.trains and exp.train.init not in (RELEASE, SCRATCH):
        brought["train.init"] = exp.train.init
    for key, ref in brought.items():
        if ref is None or ref in (RELEASE, POST_TRAINED):
            continue
        if not Path(ref).is_file():
            where = "" if Path(ref).is_absolute() else f" (relative to {Path.cwd()})"
            raise ExperimentError(
                f"{exp.source}: {key}: {ref} does not exist{where}; give the path of an existing file"
                + (", or release / post-trained" if key == "infer.checkpoint" else "")
            )


# The first line of the resolved experiment (results/<name>/experiment.yaml) that every script reads: it names the
# file the user wrote, so that errors found later point at the file to edit, not at the generated copy.
RESOLVED_HEADER = "# resolved from "


def resolved_yaml(exp: Experiment) -> str:
    """The validated, defaulted experiment as YAML, headed by the file it was resolved from."""
    header = f"{RESOLVED_HEADER}{exp.source} (edit that file, not this one)\n"
    return header + yaml.safe_dump(exp.to_dict(), sort_keys=False)


def _origin(text: str, path: Path) -> str:
    """The user's file a resolved experiment came from (its header), else the file itself."""
    first = text.split("\n", 1)[0]
    if first.startswith(RESOLVED_HEADER) and first.endswith(" (edit that file, not this one)"):
        return first[len(RESOLVED_HEADER) : -len(" (edit that file, not this one)")]
    return str(path)


def load_experiment(path: str | Path) -> Experiment:
    """Read, validate and default an experiment YAML file. Errors in a resolved copy name the user's file."""
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
    source = _origin(text, path)
    return Experiment.from_config(validate(cfg, source), source)


# ----------------------------------------------------------------------------------------------- the typed experiment
# One frozen dataclass per section, built once from the validated (defaulted) mapping; a test checks that their
# fields are exactly the schema's properties, so the two cannot drift apart.


@dataclass(frozen=True)
class ModelCfg:
    preset: str
    overrides: dict
    reinit: tuple[str, ...]  # applied when training starts from the release
    ignore_keys: tuple[str, ...]
    allow_pickle: bool


@dataclass(frozen=True)
class DataCfg:
    source: str  # synthetic | mock | real
    num_clips: int
    held_out: int
    mock_items: int
    num_frames: int  # pixel frames per view, 1 + 8k
    height: int
    width: int
    cameras: tuple[str, ...]
    text_len: int
    fps: float
    seed: int
    num_workers: int
    cache_in_memory: bool
    allow_pickle: bool
    skip_bad_clips: bool
    root: str | None = None
    view_map: dict | None = None
    window_stride: int | None = None


@dataclass(frozen=True)
class LoraCfg:
    enabled: bool
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


@dataclass(frozen=True)
class TrainCfg:
    init: str  # release | scratch | path of a model.pt
    iterations: int
    save_iter: int
    batch_size: int
    nproc: int
    nodes: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    warmup_steps: int
    warmup_start: float
    grad_clip: float
    ema_rate: float
    text_dropout: float
    max_cond_frames: int
    min_cond_frames: int
    sigma_p_mean: float
    sigma_p_std: float
    precision: str
    activation_checkpointing: str
    compile: bool
    cache_latents: bool
    sharding: str
    shard_group_size: int
    seed: int
    max_nonfinite_streak: int
    tensorboard: bool
    keep_checkpoints: int
    lora: LoraCfg


@dataclass(frozen=True)
class InferCfg:
    checkpoint: str  # post-trained | release | path of a model.pt
    adapter: str | None
    compat: str
    steps: int
    guidance: float
    seed: int
    fps: float
    num_input_frames: int
    frame_repeat: float
    offload_text_encoder: bool
    offload_tokenizer: bool
    precision: str
    batch_guidance: bool
    compile: bool
    sdpa_backend: str
    nproc: int
    context_parallel: str
    visual_root: str
    eval_clips: int
    eval_samples: int
    prompt_sets: tuple[str, ...] | None = None

    def sampling_defaults(self) -> dict:
        """What a prompt set that does not say takes from the experiment."""
        keys = ("num_input_frames", "seed", "guidance", "steps", "fps")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class ExportCfg:
    iteration: str | int  # "last" or a saved iteration
    weights: str  # ema | reg
    upstream_layout: bool
    replace_upstream: bool


@dataclass(frozen=True)
class Experiment:
    """A validated experiment with every default filled; paths are relative to the working directory."""

    name: str
    checkpoint_dir: str
    checkpoint_source: str
    model: ModelCfg
    data: DataCfg
    train: TrainCfg
    infer: InferCfg
    export: ExportCfg
    resources: dict  # {"train": {...}, "infer": {...}}: cluster settings read by the Snakefile only
    source: str = "<config>"  # the file it came from, for error messages

    @classmethod
    def from_config(cls, cfg: dict, source: str = "<config>") -> Experiment:
        """From a mapping that `validate` has already checked and defaulted."""
        t = dict(cfg["train"])
        t["lora"] = _section(LoraCfg, t["lora"])
        return cls(
            name=cfg["name"],
            checkpoint_dir=cfg["checkpoint_dir"],
            checkpoint_source=cfg["checkpoint_source"],
            model=_section(ModelCfg, cfg["model"]),
            data=_section(DataCfg, cfg["data"]),
            train=_section(TrainCfg, t),
            infer=_section(InferCfg, cfg["infer"]),
            export=_section(ExportCfg, cfg["export"]),
            resources=copy.deepcopy(cfg["resources"]),
            source=source,
        )

    # --- what runs
    @property
    def trains(self) -> bool:
        """Only an experiment whose inference reads its own post-trained model trains."""
        return self.infer.checkpoint == POST_TRAINED

    @property
    def net(self) -> NetConfig:
        return get_preset(self.model.preset, **self.model.overrides)

    @property
    def camera_indices(self) -> list[int]:
        return [CAMERAS.index(c) for c in self.data.cameras]

    # --- where things are: checkpoints/<repo name>/ as upstream lays them out, results/<name>/ for everything else
    def repo_dir(self, repo: str) -> Path:
        return Path(self.checkpoint_dir) / REPO_SUBDIRS[repo]

    @property
    def dit_dir(self) -> Path:
        return self.repo_dir(DIT_REPO)

    @property
    def tokenizer_dir(self) -> Path:
        return self.repo_dir(TOKENIZER_REPO)

    @property
    def t5_dir(self) -> Path:
        return self.repo_dir(T5_REPO)

    @property
    def release_checkpoint(self) -> Path:
        return self.dit_dir / "model.pt"

    @property
    def results(self) -> Path:
        return Path("results") / self.name

    @property
    def post_trained(self) -> Path:
        """This experiment's post-trained model (the export rule writes it; nobody else does)."""
        return self.results / "post-trained" / "model.pt"

    @property
    def upstream_post_trained(self) -> Path:
        """Where upstream's inference script reads a post-trained model: <ckpt dir>/<DiT name>_post-trained/model.pt."""
        return Path(self.checkpoint_dir) / f"{self.dit_dir.name}_post-trained" / "model.pt"

    @property
    def infer_checkpoint(self) -> Path:
        return checkpoint_path(self, self.infer.checkpoint)

    @property
    def init_checkpoint(self) -> Path | None:
        """The model.pt training starts from (None: from scratch)."""
        return None if self.train.init == SCRATCH else checkpoint_path(self, self.train.init)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return _plain(d)


POST_TRAINED, RELEASE, SCRATCH = "post-trained", "release", "scratch"


def checkpoint_path(exp: Experiment, ref: str) -> Path:
    """`release`, `post-trained` (this experiment's), or a model.pt path as written."""
    if ref == RELEASE:
        return exp.release_checkpoint
    if ref == POST_TRAINED:
        return exp.post_trained
    return Path(ref)


def _section(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return cls(**values)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    """python -m mvdit.workflow.experiment FILE...: validate experiment files (exit 1 with one line per bad file)."""
    import sys

    bad = 0
    for path in argv if argv is not None else sys.argv[1:]:
        try:
            check_files(load_experiment(path))
            print(f"{path}: ok")
        except ExperimentError as e:
            print(f"error: {e}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
