# Post-training and inference of Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview, one rule per step:
# checkpoints -> data + T5 embeddings -> torchrun post-training -> EMA copy -> inference per prompt set -> report.
# Default: the tiny demo (CPU, minutes). The 7B experiment: --configfile experiments/video2world_multiview_7b_example.yaml
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

BASE = Path(workflow.basedir)  # scripts, prompts and assets live here; results/ and checkpoints/ in the workdir
SRC = BASE / "src"
sys.path.insert(0, str(SRC))
from mvdit.experiment import ExperimentError, SCHEMA_PATH
from mvdit.experiment import validate as validate_experiment
from mvdit.experiment import dit_dir, post_trained_dir, t5_dir, tokenizer_dir
from mvdit.prompts import PromptSetError, load_prompt_sets
from mvdit.stale_locks import clear_stale_locks

min_version("9.0")

if clear_stale_locks(Path.cwd()):
    print("note: removed locks left by a killed snakemake run of this workflow", file=sys.stderr)


# The default experiment, unless --configfile names one (then the default is not merged underneath it).
if not workflow.config_settings.configfiles:

    configfile: str(BASE / "experiments" / "tiny_demo.yaml")


try:
    _source = workflow.config_settings.configfiles or [BASE / "experiments" / "tiny_demo.yaml"]
    validate_experiment(config, str(_source[-1]))  # one-line errors naming the file and key
except ExperimentError as e:
    sys.exit(f"error: {e}")
validate(config, str(SCHEMA_PATH))  # the same schema through Snakemake (defaults already filled)

EXP = config["name"]
R = f"results/{EXP}"
# the venv's Python normally; the rule's conda env's `python` under --sdm conda (scripts find mvdit beside them)
PY = "python" if "conda" in str(workflow.deployment_settings.deployment_method).lower() else sys.executable
ENV = "envs/mvdit.yaml"
RESOLVED = f"{R}/experiment.yaml"  # the validated config every script reads (written when it changes)
Path(R).mkdir(parents=True, exist_ok=True)
_text = yaml.safe_dump(dict(config), sort_keys=False)
if not Path(RESOLVED).exists() or Path(RESOLVED).read_text() != _text:
    Path(RESOLVED).write_text(_text)

T, INF, RES = config["train"], config["infer"], config["resources"]
DIT, TOK, T5 = str(dit_dir(config)), str(tokenizer_dir(config)), str(t5_dir(config))
POST = f"{post_trained_dir(config)}/model.pt"
MANIFEST = ".mvdit_manifest.json"
# inference reads the post-trained copy, or the released model.pt that the download rule's manifest vouches for
CKPT_FOR_INFER = POST if INF["checkpoint"] == "post-trained" else f"{DIT}/{MANIFEST}"
# several inference (and evaluation) processes per sample run under torchrun; a stop signal ends them (nothing to save)
INFER_RUN = f"{PY} {SRC}/launch.py --nproc {INF['nproc']} --on-stop terminate --" if INF["nproc"] > 1 else PY
HAS_EVAL = config["data"]["source"] != "mock" and config["data"]["held_out"] > 0 and T["init"] == "release"


def prompt_sets():
    """{name: (file, index)} for prompts/*.yaml and every line of prompts/*.jsonl (optionally filtered)."""
    sets = {}
    files = sorted((BASE / "prompts").glob("*.yaml")) + sorted((BASE / "prompts").glob("*.jsonl"))
    for f in files:
        try:
            found = load_prompt_sets(f, config["data"]["cameras"], BASE)
        except PromptSetError as e:
            sys.exit(f"error: {e}")
        for i, ps in enumerate(found):
            sets[ps.name] = (str(f), i)
    wanted = INF.get("prompt_sets")
    if wanted:
        unknown = sorted(set(wanted) - set(sets))
        if unknown:
            sys.exit(f"error: infer.prompt_sets names unknown set {unknown[0]!r} (have: {', '.join(sets)})")
        sets = {k: v for k, v in sets.items() if k in wanted}
    return sets


SETS = prompt_sets()


def res(stage, key, default):
    return RES.get(stage, {}).get(key, default)


def slurm_resources(stage):
    """Keys only the SLURM executor plugin reads (docs/cluster.md): partition, account and constraint when
    resources.<stage> sets them (else the profile's default-resources apply); for training also the GPUs, the
    multi-node `mpi` path and SLURM's pre-timeout signal (SIGURG: launch.py has the training save and exit 3)."""
    keys = {"partition": "slurm_partition", "account": "slurm_account", "constraint": "constraint"}
    out = {keys[k]: v for k, v in RES.get(stage, {}).items() if k in keys}
    if stage != "train":
        return out
    nodes, gpus = res("train", "nodes", T["nodes"]), res("train", "gpus", 0)
    signal = f"--signal=URG@{res('train', 'stop_before_s', min(600, 30 * res('train', 'runtime', 60)))}"
    if nodes == 1:  # runs inside the plugin's `srun -n1 --gpus=G`, where launch.py starts torchrun
        return out | {"gpu": gpus, "slurm_extra": signal}
    # several nodes: the rule runs in the job's batch step and launch.py starts one srun task per node
    per_node = "--ntasks-per-node=1" + (f" --gpus-per-node={gpus}" if gpus else "")
    return out | {"mpi": "srun", "tasks": nodes, "slurm_extra": f"{per_node} {signal}"}


localrules:
    download,
    report,


rule all:
    input:
        f"{R}/report/metrics.json",
        f"{R}/report/loss.png",
        expand(f"{R}/infer/{{ps}}/{{ps}}_grid.mp4", ps=SETS),


rule download:
    output:
        dit=f"{DIT}/{MANIFEST}",
        tokenizer=f"{TOK}/{MANIFEST}",
        t5=f"{T5}/{MANIFEST}",
    log:
        f"{R}/logs/download.log",
    conda:
        ENV
    params:
        py=PY,
        src=SRC,
        source=config["checkpoint_source"],
        ckpt=lambda w, output: Path(output.dit).parent.parent,
    shell:
        "{params.py} {params.src}/download.py --checkpoint-dir {params.ckpt} --source {params.source} > {log} 2>&1"


rule prepare_data:
    input:
        t5=rules.download.output.t5,
    output:
        f"{R}/data/manifest.json",
    log:
        f"{R}/logs/prepare_data.log",
    benchmark:
        f"{R}/benchmarks/prepare_data.tsv"
    conda:
        ENV
    resources:  # a GPU job like inference (T5-11B embeddings)
        **slurm_resources("infer"),
        gpu=res("infer", "gpus", 0),
        cpus_per_task=res("infer", "cpus_per_task", 1),
        runtime=res("infer", "runtime", 30),
        mem_mb=res("infer", "mem_mb", 4000),
    params:
        py=PY,
        src=SRC,
        exp=RESOLVED,
        data=config["data"],
        out=lambda w, output: Path(output[0]).parent,
        t5=lambda w, input: Path(input.t5).parent,
    shell:
        "{params.py} {params.src}/prepare_data.py --experiment {params.exp} --out-dir {params.out} --t5-dir {params.t5}"
        " > {log} 2>&1"


rule train:
    input:
        data=rules.prepare_data.output,
        dit=rules.download.output.dit,
        tokenizer=rules.download.output.tokenizer,
    output:
        f"{R}/train/final.json",
    log:
        f"{R}/logs/train.log",
    benchmark:
        f"{R}/benchmarks/train.tsv"
    conda:
        ENV
    threads: T["nproc"]
    resources:
        **slurm_resources("train"),
        nodes=res("train", "nodes", T["nodes"]),
        cpus_per_task=res("train", "cpus_per_task", T["nproc"]),
        runtime=res("train", "runtime", 60),
        mem_mb=res("train", "mem_mb", 8000),
    params:
        py=PY,
        src=SRC,
        exp=RESOLVED,
        train=T,
        model=config["model"],
        out=lambda w, output: Path(output[0]).parent,
        init=lambda w, input: Path(input.dit).parent / "model.pt",
        tok=lambda w, input: Path(input.tokenizer).parent,
    shell:
        "{params.py} {params.src}/launch.py --nproc {params.train[nproc]} --nnodes {params.train[nodes]} --"
        " {params.src}/train.py --experiment {params.exp} --data-manifest {input.data} --out-dir {params.out}"
        " --init-checkpoint {params.init} --tokenizer-dir {params.tok} >> {log} 2>&1"


rule copy_ema:
    input:
        rules.train.output,
    output:
        POST,
    log:
        f"{R}/logs/copy_ema.log",
    conda:
        ENV
    resources:  # CPU only, but loads the whole model
        **slurm_resources("infer"),
        runtime=30,
        mem_mb=res("infer", "mem_mb", 4000),
    params:
        py=PY,
        src=SRC,
        exp=RESOLVED,
        train_dir=lambda w, input: Path(input[0]).parent,
    shell:
        "{params.py} {params.src}/copy_ema.py --experiment {params.exp} --train-dir {params.train_dir} --out {output}"
        " > {log} 2>&1"


rule infer:
    input:
        checkpoint=CKPT_FOR_INFER,
        prompt_set=lambda w: SETS[w.ps][0],
        tokenizer=rules.download.output.tokenizer,
        t5=rules.download.output.t5,
    output:
        grid=report(
            f"{R}/infer/{{ps}}/{{ps}}_grid.mp4",
            category="Inference",
            subcategory="{ps}",
            labels={"prompt set": "{ps}", "file": "2x3 grid"},
        ),
        sheet=report(
            f"{R}/infer/{{ps}}/{{ps}}_sheet.png",
            category="Inference",
            subcategory="{ps}",
            labels={"prompt set": "{ps}", "file": "contact sheet"},
        ),
        meta=f"{R}/infer/{{ps}}/{{ps}}.json",
    log:
        f"{R}/logs/infer/{{ps}}.log",
    benchmark:
        f"{R}/benchmarks/infer_{{ps}}.tsv"
    wildcard_constraints:
        ps="[A-Za-z0-9_.-]+",
    conda:
        ENV
    resources:  # infer.nproc processes share each sample (context parallelism), one GPU and its CPUs each
        **slurm_resources("infer"),
        gpu=res("infer", "gpus", 0) * INF["nproc"],
        cpus_per_task=res("infer", "cpus_per_task", 1) * INF["nproc"],
        runtime=res("infer", "runtime", 30),
        mem_mb=res("infer", "mem_mb", 4000),
    params:
        run=INFER_RUN,
        src=SRC,
        base=BASE,
        exp=RESOLVED,
        infer=INF,
        index=lambda w: SETS[w.ps][1],
        ckpt=lambda w, input: Path(input.checkpoint).with_name("model.pt"),
        out=lambda w, output: Path(output.meta).parent,
        tok=lambda w, input: Path(input.tokenizer).parent,
        t5=lambda w, input: Path(input.t5).parent,
    shell:
        "{params.run} {params.src}/infer.py --experiment {params.exp} --prompt-set {input.prompt_set} --index {params.index}"
        " --checkpoint {params.ckpt} --out-dir {params.out} --tokenizer-dir {params.tok} --t5-dir {params.t5}"
        " --project-root {params.base}"
        " > {log} 2>&1"


rule evaluate:
    input:
        trained=POST,
        data=rules.prepare_data.output,
        dit=rules.download.output.dit,
        tokenizer=rules.download.output.tokenizer,
    output:
        f"{R}/report/eval.json",
    log:
        f"{R}/logs/evaluate.log",
    conda:
        ENV
    resources:  # a GPU job like inference (samples the DiT, infer.nproc processes per sample)
        **slurm_resources("infer"),
        gpu=res("infer", "gpus", 0) * INF["nproc"],
        cpus_per_task=res("infer", "cpus_per_task", 1) * INF["nproc"],
        runtime=res("infer", "runtime", 30),
        mem_mb=res("infer", "mem_mb", 4000),
    params:
        run=INFER_RUN,
        src=SRC,
        exp=RESOLVED,
        infer=INF,
        baseline=lambda w, input: Path(input.dit).parent / "model.pt",
        tok=lambda w, input: Path(input.tokenizer).parent,
    shell:
        "{params.run} {params.src}/evaluate.py --experiment {params.exp} --data-manifest {input.data} --trained {input.trained}"
        " --baseline {params.baseline} --tokenizer-dir {params.tok} --out {output} > {log} 2>&1"


rule report:
    input:
        train=rules.train.output,
        eval=rules.evaluate.output if HAS_EVAL else [],
        infer=expand(f"{R}/infer/{{ps}}/{{ps}}.json", ps=SETS),
    output:
        loss=report(f"{R}/report/loss.png", category="Training", labels={"plot": "loss curve"}),
        metrics=report(f"{R}/report/metrics.json", category="Metrics", labels={"file": "metrics"}),
    log:
        f"{R}/logs/report.log",
    conda:
        ENV
    params:
        py=PY,
        src=SRC,
        title=EXP,
        eval_arg=lambda w, input: f"--eval {input.eval}" if input.eval else "",
        log_jsonl=lambda w, input: Path(input.train[0]).parent / "train_log.jsonl",
    shell:
        "{params.py} {params.src}/report.py --train-log {params.log_jsonl} {params.eval_arg} --infer-json {input.infer}"
        " --loss-png {output.loss} --metrics {output.metrics} --title {params.title} > {log} 2>&1"
