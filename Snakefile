# Post-training and inference of Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview, one rule per step:
# checkpoints -> data + T5 embeddings -> torchrun post-training -> EMA copy -> inference per prompt set -> report.
# Default: the tiny demo (CPU, minutes). The 7B experiment: --configfile experiments/video2world_multiview_7b_example.yaml
# An experiment whose infer.checkpoint is not `post-trained` does not train: download (what is missing) -> infer -> report.
import functools
import re
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

BASE = Path(workflow.basedir)  # scripts, prompts and assets live here; results/ and checkpoints/ in the workdir
SRC = BASE / "src"
sys.path.insert(0, str(SRC))
from mvdit.constants import DIT_REPO, T5_REPO, TOKENIZER_REPO
from mvdit.workflow.experiment import RELEASE, SCHEMA_PATH, SCRATCH, Experiment, ExperimentError, check_files
from mvdit.workflow.experiment import resolved_yaml
from mvdit.workflow.experiment import validate as validate_experiment
from mvdit.data.prompts import PromptSetError, load_prompt_sets, resolve_prompt_sets
from mvdit.workflow.stale_locks import clear_stale_locks_if_main

min_version("9.0")

if clear_stale_locks_if_main(workflow, Path.cwd()):  # jobs parsing on compute nodes never touch the locks
    print("note: removed locks left by a killed snakemake run of this workflow", file=sys.stderr)


# The default experiment, unless --configfile names one (then the default is not merged underneath it).
if not workflow.config_settings.configfiles:

    configfile: str(BASE / "experiments" / "tiny_demo.yaml")


_source = str((workflow.config_settings.configfiles or [BASE / "experiments" / "tiny_demo.yaml"])[-1])
try:
    E = Experiment.from_config(validate_experiment(config, _source), _source)  # one-line errors: file and key
    check_files(E)
except ExperimentError as e:
    sys.exit(f"error: {e}")
validate(config, str(SCHEMA_PATH))  # the same schema through Snakemake (defaults already filled)

R = str(E.results)
# the venv's Python normally; the rule's conda env's `python` under --sdm conda (scripts find mvdit beside them)
PY = "python" if "conda" in str(workflow.deployment_settings.deployment_method).lower() else sys.executable
ENV = "envs/mvdit.yaml"
RESOLVED = f"{R}/experiment.yaml"  # the validated config every script reads (written when it changes)
Path(R).mkdir(parents=True, exist_ok=True)
_text = resolved_yaml(E)  # headed by the user's file, which the scripts' errors then name
if not Path(RESOLVED).exists() or Path(RESOLVED).read_text() != _text:
    Path(RESOLVED).write_text(_text)

T, INF, RES = E.train, E.infer, E.resources
MANIFEST = ".mvdit_manifest.json"
REPO_DIRS = {E.repo_dir(r).relative_to(E.checkpoint_dir).as_posix(): r for r in (DIT_REPO, TOKENIZER_REPO, T5_REPO)}
DIT, TOK, T5 = (f"{E.repo_dir(r)}/{MANIFEST}" for r in (DIT_REPO, TOKENIZER_REPO, T5_REPO))
POST = str(E.post_trained)


def checkpoint_input(ref: str, path: Path) -> str:
    """What a rule waits for: the release's download manifest (it vouches for model.pt), or the file itself."""
    return DIT if ref == RELEASE else str(path)


# several inference (and evaluation) processes per sample run under torchrun; a stop signal ends them (nothing to save)
INFER_RUN = f"{PY} {SRC}/launch.py --nproc {INF.nproc} --on-stop terminate --" if INF.nproc > 1 else PY
# the evaluation compares the post-trained model with the one training started from, on held-out clips
HAS_EVAL = E.trains and E.data.source != "mock" and E.data.held_out > 0 and INF.eval_clips > 0 and T.init != SCRATCH
try:
    SETS = resolve_prompt_sets(INF.prompt_sets, BASE, list(E.data.cameras), BASE / INF.visual_root, _source)
except PromptSetError as e:
    sys.exit(f"error: {e}")


@functools.cache
def prompt_sets_in(file) -> list:
    """A prompt-set file parsed once per Snakemake run (a JSONL file holds many sets)."""
    return load_prompt_sets(file, list(E.data.cameras), BASE, visual_root=BASE / INF.visual_root)


def set_inputs(w) -> list[str]:
    """The clips or stills a prompt set conditions on: inputs of its infer job, so a missing one shows in the plan."""
    file, index = SETS[w.ps]
    ps = prompt_sets_in(file)[index]
    return [str(p) for p in (ps.input.values() if isinstance(ps.input, dict) else [ps.input])]


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
    nodes, gpus = res("train", "nodes", T.nodes), res("train", "gpus", 0)
    signal = f"--signal=URG@{res('train', 'stop_before_s', min(600, 30 * res('train', 'runtime', 60)))}"
    if nodes == 1:  # runs inside the plugin's `srun -n1 --gpus=G`, where launch.py starts torchrun
        return out | {"gpu": gpus, "slurm_extra": signal}
    # several nodes: the rule runs in the job's batch step and launch.py starts one srun task per node
    per_node = "--ntasks-per-node=1" + (f" --gpus-per-node={gpus}" if gpus else "")
    return out | {"mpi": "srun", "tasks": nodes, "slurm_extra": f"{per_node} {signal}"}


localrules:
    download,
    report,
    upstream_layout,


rule all:
    input:
        f"{R}/report/metrics.json",
        expand(f"{R}/infer/{{ps}}/{{ps}}_grid.mp4", ps=SETS),
        f"{R}/post-trained/upstream_layout.json" if E.export.upstream_layout else [],


rule download:
    output:
        f"{E.checkpoint_dir}/{{repo}}/{MANIFEST}",
    log:
        f"{R}/logs/download/{{repo}}.log",
    wildcard_constraints:
        repo="|".join(map(re.escape, REPO_DIRS)),
    conda:
        ENV
    params:
        py=PY,
        src=SRC,
        source=E.checkpoint_source,
        ckpt=lambda w, output: Path(output[0]).parents[len(Path(w.repo).parts)],  # <checkpoint_dir>
        repo=lambda w: REPO_DIRS[w.repo],
    shell:
        "{params.py} {params.src}/download.py --checkpoint-dir {params.ckpt} --source {params.source}"
        " --repo {params.repo} > {log} 2>&1"


rule prepare_data:
    input:
        t5=T5,
    output:
        f"{R}/data/manifest.json",
    log:
        f"{R}/logs/prepare_data.log",
    benchmark:
        f"{R}/benchmarks/prepare_data.tsv"
    conda:
        ENV
    threads: 4  # processes rendering synthetic clips (Snakemake lowers it to --cores)
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
        " --workers {threads} > {log} 2>&1"


rule train:
    input:
        data=rules.prepare_data.output,
        init=[] if T.init == SCRATCH else checkpoint_input(T.init, E.init_checkpoint),
        tokenizer=TOK,
    output:
        f"{R}/train/final.json",
    log:
        f"{R}/logs/train.log",
    benchmark:
        f"{R}/benchmarks/train.tsv"
    conda:
        ENV
    threads: T.nproc
    resources:
        **slurm_resources("train"),
        nodes=res("train", "nodes", T.nodes),
        cpus_per_task=res("train", "cpus_per_task", T.nproc),
        runtime=res("train", "runtime", 60),
        mem_mb=res("train", "mem_mb", 8000),
    params:
        py=PY,
        src=SRC,
        exp=RESOLVED,
        train=config["train"],
        model=config["model"],
        out=lambda w, output: Path(output[0]).parent,
        init="" if T.init == SCRATCH else f"--init-checkpoint {E.init_checkpoint}",
        tok=lambda w, input: Path(input.tokenizer).parent,
    shell:
        "{params.py} {params.src}/launch.py --nproc {params.train[nproc]} --nnodes {params.train[nodes]} --"
        " {params.src}/train.py --experiment {params.exp} --data-manifest {input.data} --out-dir {params.out}"
        " {params.init} --tokenizer-dir {params.tok} >> {log} 2>&1"


rule copy_ema:
    input:
        rules.train.output,
    output:
        model=POST,
        config=str(E.post_trained.with_name("config.json")),
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
        export=config["export"],
        train_dir=lambda w, input: Path(input[0]).parent,
    shell:
        "{params.py} {params.src}/copy_ema.py --experiment {params.exp} --train-dir {params.train_dir}"
        " --out {output.model} > {log} 2>&1"


rule upstream_layout:
    input:
        POST,
    output:
        f"{R}/post-trained/upstream_layout.json",
    log:
        f"{R}/logs/upstream_layout.log",
    conda:
        ENV
    params:
        py=PY,
        src=SRC,
        exp=RESOLVED,
        to=E.upstream_post_trained,
    shell:
        "{params.py} {params.src}/copy_ema.py --experiment {params.exp} --publish {input} --to {params.to}"
        " --record {output} > {log} 2>&1"


rule infer:
    input:
        checkpoint=checkpoint_input(INF.checkpoint, E.infer_checkpoint),
        adapter=INF.adapter or [],
        prompt_set=lambda w: SETS[w.ps][0],
        visual=set_inputs,
        tokenizer=TOK,
        t5=T5,
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
        gpu=res("infer", "gpus", 0) * INF.nproc,
        cpus_per_task=res("infer", "cpus_per_task", 1) * INF.nproc,
        runtime=res("infer", "runtime", 30),
        mem_mb=res("infer", "mem_mb", 4000),
    params:
        run=INFER_RUN,
        src=SRC,
        base=BASE,
        exp=RESOLVED,
        infer=config["infer"],
        index=lambda w: SETS[w.ps][1],
        ckpt=E.infer_checkpoint,
        adapter=f"--adapter {INF.adapter}" if INF.adapter else "",
        out=lambda w, output: Path(output.meta).parent,
        tok=lambda w, input: Path(input.tokenizer).parent,
        t5=lambda w, input: Path(input.t5).parent,
    shell:
        "{params.run} {params.src}/infer.py --experiment {params.exp} --prompt-set {input.prompt_set} --index {params.index}"
        " --checkpoint {params.ckpt} {params.adapter} --out-dir {params.out} --tokenizer-dir {params.tok}"
        " --t5-dir {params.t5} --project-root {params.base} > {log} 2>&1"


rule evaluate:
    input:
        trained=POST,
        data=rules.prepare_data.output,
        baseline=checkpoint_input(T.init, E.init_checkpoint or E.release_checkpoint),
        tokenizer=TOK,
    output:
        eval=f"{R}/report/eval.json",
        sheet=report(
            f"{R}/report/heldout.png",
            category="Held-out clips",
            labels={"figure": "ground truth vs. post-trained sample"},
        ),
    log:
        f"{R}/logs/evaluate.log",
    conda:
        ENV
    resources:  # a GPU job like inference (samples the DiT, infer.nproc processes per sample)
        **slurm_resources("infer"),
        gpu=res("infer", "gpus", 0) * INF.nproc,
        cpus_per_task=res("infer", "cpus_per_task", 1) * INF.nproc,
        runtime=res("infer", "runtime", 30),
        mem_mb=res("infer", "mem_mb", 4000),
    params:
        run=INFER_RUN,
        src=SRC,
        exp=RESOLVED,
        infer=config["infer"],
        baseline=E.init_checkpoint or E.release_checkpoint,
        tok=lambda w, input: Path(input.tokenizer).parent,
    shell:
        "{params.run} {params.src}/evaluate.py --experiment {params.exp} --data-manifest {input.data} --trained {input.trained}"
        " --baseline {params.baseline} --tokenizer-dir {params.tok} --out {output.eval} --sheet {output.sheet}"
        " > {log} 2>&1"


rule report:
    input:
        train=rules.train.output if E.trains else [],
        eval=rules.evaluate.output.eval if HAS_EVAL else [],
        infer=expand(f"{R}/infer/{{ps}}/{{ps}}.json", ps=SETS),
    output:
        **(
            {"loss": report(f"{R}/report/loss.png", category="Training", labels={"plot": "loss curve"})}
            if E.trains
            else {}
        ),
        **(
            {
                "psnr": report(
                    f"{R}/report/psnr_per_clip.png", category="Metrics", labels={"plot": "held-out PSNR per clip"}
                )
            }
            if HAS_EVAL
            else {}
        ),
        metrics=report(f"{R}/report/metrics.json", category="Metrics", labels={"file": "metrics"}),
    log:
        f"{R}/logs/report.log",
    conda:
        ENV
    params:
        py=PY,
        src=SRC,
        title=E.name,
        eval_arg=lambda w, input, output: f"--eval {input.eval} --psnr-png {output.psnr}" if input.eval else "",
        train_args=lambda w, input, output: (
            f"--train-log {Path(input.train[0]).parent / 'train_log.jsonl'} --loss-png {output.loss}"
            if input.train
            else ""
        ),
    shell:
        "{params.py} {params.src}/report.py {params.train_args} {params.eval_arg} --infer-json {input.infer}"
        " --metrics {output.metrics} --title {params.title} > {log} 2>&1"
