# Post-training and inference of Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview, one rule per step:
# checkpoints -> data + T5 embeddings -> torchrun post-training -> EMA copy -> inference per prompt set -> report.
# Default: the tiny demo (CPU, minutes). The 7B experiment: --configfile experiments/video2world_multiview_7b_example.yaml
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from mvdit.constants import DIT_REPO, T5_REPO, TOKENIZER_REPO
from mvdit.experiment import ExperimentError, SCHEMA_PATH
from mvdit.experiment import validate as validate_experiment
from mvdit.experiment import dit_dir, post_trained_dir, t5_dir, tokenizer_dir
from mvdit.prompts import PromptSetError, load_prompt_sets

min_version("9.0")


configfile: "experiments/tiny_demo.yaml"


try:
    validate_experiment(config, "experiment config")  # one-line errors naming the key
except ExperimentError as e:
    sys.exit(f"error: {e}")
validate(
    config, str(SCHEMA_PATH)
)  # the same schema through Snakemake (defaults already filled)

EXP = config["name"]
R = f"results/{EXP}"
PY = sys.executable
RESOLVED = f"{R}/experiment.yaml"  # the validated config every script reads (written when it changes)
Path(R).mkdir(parents=True, exist_ok=True)
_text = yaml.safe_dump(dict(config), sort_keys=False)
if not Path(RESOLVED).exists() or Path(RESOLVED).read_text() != _text:
    Path(RESOLVED).write_text(_text)

T, INF, RES = config["train"], config["infer"], config["resources"]
DIT, TOK, T5 = str(dit_dir(config)), str(tokenizer_dir(config)), str(t5_dir(config))
POST = f"{post_trained_dir(config)}/model.pt"
CKPT_FOR_INFER = POST if INF["checkpoint"] == "post-trained" else f"{DIT}/model.pt"
MANIFEST = ".mvdit_manifest.json"
HAS_EVAL = (
    config["data"]["source"] != "mock"
    and config["data"]["held_out"] > 0
    and T["init"] == "release"
)


def prompt_sets():
    """{name: (file, index)} for prompts/*.yaml and every line of prompts/*.jsonl (optionally filtered)."""
    sets = {}
    for f in sorted(Path("prompts").glob("*.yaml")) + sorted(
        Path("prompts").glob("*.jsonl")
    ):
        try:
            found = load_prompt_sets(f, config["data"]["cameras"], Path.cwd())
        except PromptSetError as e:
            sys.exit(f"error: {e}")
        for i, ps in enumerate(found):
            sets[ps.name] = (str(f), i)
    wanted = INF.get("prompt_sets")
    if wanted:
        unknown = sorted(set(wanted) - set(sets))
        if unknown:
            sys.exit(
                f"error: infer.prompt_sets names unknown set {unknown[0]!r} (have: {', '.join(sets)})"
            )
        sets = {k: v for k, v in sets.items() if k in wanted}
    return sets


SETS = prompt_sets()


def res(stage, key, default):
    return RES.get(stage, {}).get(key, default)


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
    params:
        source=config["checkpoint_source"],
        ckpt=config["checkpoint_dir"],
    shell:
        "{PY} src/download.py --checkpoint-dir {params.ckpt} --source {params.source} > {log} 2>&1"


rule prepare_data:
    input:
        rules.download.output.t5,
    output:
        f"{R}/data/manifest.json",
    log:
        f"{R}/logs/prepare_data.log",
    benchmark:
        f"{R}/benchmarks/prepare_data.tsv"
    params:
        data=config["data"],
        out=f"{R}/data",
    shell:
        "{PY} src/prepare_data.py --experiment {RESOLVED} --out-dir {params.out} --t5-dir {T5} > {log} 2>&1"


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
    threads: T["nproc"]
    resources:
        gpus=res("train", "gpus", 0),
        nodes=res("train", "nodes", T["nodes"]),
        tasks_per_node=1,
        runtime=res("train", "runtime", 60),
        mem_mb=res("train", "mem_mb", 8000),
    params:
        train=T,
        model=config["model"],
        out=f"{R}/train",
    shell:
        "{PY} src/launch.py --nproc {T[nproc]} --nnodes {T[nodes]} -- src/train.py --experiment {RESOLVED}"
        " --data-manifest {input.data} --out-dir {params.out} --init-checkpoint {DIT}/model.pt"
        " --tokenizer-dir {TOK} > {log} 2>&1"


rule copy_ema:
    input:
        rules.train.output,
    output:
        POST,
    log:
        f"{R}/logs/copy_ema.log",
    params:
        train_dir=f"{R}/train",
    shell:
        "{PY} src/copy_ema.py --experiment {RESOLVED} --train-dir {params.train_dir} --out {output} > {log} 2>&1"


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
    resources:
        gpus=res("infer", "gpus", 0),
        runtime=res("infer", "runtime", 30),
        mem_mb=res("infer", "mem_mb", 4000),
    params:
        infer=INF,
        index=lambda w: SETS[w.ps][1],
        out=lambda w: f"{R}/infer/{w.ps}",
    shell:
        "{PY} src/infer.py --experiment {RESOLVED} --prompt-set {input.prompt_set} --index {params.index}"
        " --checkpoint {input.checkpoint} --out-dir {params.out} --tokenizer-dir {TOK} --t5-dir {T5} > {log} 2>&1"


rule evaluate:
    input:
        trained=POST,
        data=rules.prepare_data.output,
    output:
        f"{R}/report/eval.json",
    log:
        f"{R}/logs/evaluate.log",
    params:
        infer=INF,
    shell:
        "{PY} src/evaluate.py --experiment {RESOLVED} --data-manifest {input.data} --trained {input.trained}"
        " --baseline {DIT}/model.pt --tokenizer-dir {TOK} --out {output} > {log} 2>&1"


rule report:
    input:
        train=rules.train.output,
        eval=rules.evaluate.output if HAS_EVAL else [],
        infer=expand(f"{R}/infer/{{ps}}/{{ps}}.json", ps=SETS),
    output:
        loss=report(
            f"{R}/report/loss.png", category="Training", labels={"plot": "loss curve"}
        ),
        metrics=report(
            f"{R}/report/metrics.json", category="Metrics", labels={"file": "metrics"}
        ),
    log:
        f"{R}/logs/report.log",
    params:
        eval_arg=lambda w, input: f"--eval {input.eval}" if input.eval else "",
        log_jsonl=f"{R}/train/train_log.jsonl",
    shell:
        "{PY} src/report.py --train-log {params.log_jsonl} {params.eval_arg} --infer-json {input.infer}"
        " --loss-png {output.loss} --metrics {output.metrics} --title {EXP} > {log} 2>&1"
