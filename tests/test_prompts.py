"""Prompt sets: YAML and upstream JSONL from prompts/ or anywhere the experiment lists, the experiment's sampling
settings as defaults, upstream's default side-camera prompts, and one-line errors found before any model loads."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from mvdit.constants import CAMERAS
from mvdit.data.prompts import (
    DEFAULT_SETTINGS,
    UPSTREAM_SIDE_PROMPTS,
    PromptSetError,
    check_input,
    load_prompt_sets,
    read_condition_frames,
    resolve_prompt_sets,
)

from .helpers import DATA, ROOT

CAMS = list(CAMERAS)
SIDES = [c for c in CAMS if c != "front"]
PROMPTS = {c: f"The camera is facing {c}." for c in CAMERAS}
EXPERIMENT = {"num_input_frames": 9, "seed": 7, "guidance": 5.0, "steps": 12, "fps": 10}


def write_set(tmp_path, name="set", **d):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def write_jsonl(path, *records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def project(tmp_path):
    shutil.copy(DATA / "video2world_multiview_input1.mp4", tmp_path / "clip.mp4")
    return tmp_path


# --- what ships -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "prompts").glob("*.yaml")))
def test_shipped_prompt_sets_are_valid(name):
    for ps in load_prompt_sets(ROOT / "prompts" / name, CAMS, ROOT):
        check_input(ps, CAMS)
        frames = read_condition_frames(ps, CAMS)
        assert len(frames) == 6 and all(len(f) == ps.num_input_frames for f in frames)


def test_shipped_upstream_jsonl_runs_as_shipped():
    """Upstream's batch file, byte for byte, with its visual_input paths (assets/diffusion/...) resolved against the
    repository root: upstream's layout exists here."""
    shipped = ROOT / "assets" / "video2world_multiview.jsonl"
    assert shipped.read_bytes() == (DATA / "video2world_multiview.jsonl").read_bytes()  # the upstream copy
    sets = resolve_prompt_sets(["assets/video2world_multiview.jsonl"], ROOT, CAMS, ROOT, "exp.yaml")
    assert list(sets) == ["video2world_multiview_0", "video2world_multiview_1"]
    loaded = load_prompt_sets(shipped, CAMS, ROOT, defaults=EXPERIMENT, visual_root=ROOT)
    first = loaded[0]
    assert first.input == ROOT / "assets/diffusion/video2world_multiview_input1.mp4" and first.input.is_file()
    assert first.default_prompt_cameras == []  # every camera's prompt is in the file
    assert first.settings == EXPERIMENT
    check_input(first, CAMS)
    assert [len(v) for v in read_condition_frames(first, CAMS)] == [9] * 6
    for ps in loaded[1:]:
        if ps.input.exists():  # upstream's second clip is not shipped here (assets/README.md)
            check_input(ps, CAMS)
        else:
            with pytest.raises(PromptSetError, match=f"{ps.input} does not exist"):
                check_input(ps, CAMS)


def test_upstream_default_side_prompts_are_upstreams_strings():
    assert UPSTREAM_SIDE_PROMPTS["left"].endswith("facing to the left. ")  # upstream's trailing space, kept
    line = json.loads((ROOT / "assets/video2world_multiview.jsonl").read_text().splitlines()[0])
    assert UPSTREAM_SIDE_PROMPTS["back_left"] == line["prompt_back_left"]
    assert UPSTREAM_SIDE_PROMPTS["back_right"] == line["prompt_back_right"]
    assert sorted(UPSTREAM_SIDE_PROMPTS) == sorted(SIDES)


def test_default_settings_are_the_experiment_schemas_defaults():
    schema = yaml.safe_load((ROOT / "src/mvdit/workflow/experiment.schema.yaml").read_text())
    infer = schema["properties"]["infer"]["properties"]
    assert DEFAULT_SETTINGS == {k: infer[k]["default"] for k in DEFAULT_SETTINGS}


def test_resolving_prompt_sets_does_not_import_torch():
    code = (
        "import sys; from pathlib import Path; from mvdit.data.prompts import resolve_prompt_sets\n"
        f"resolve_prompt_sets(None, Path({str(ROOT)!r}), {CAMS!r})\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- settings: the set's own, else the experiment's -------------------------------------------------------------------


def test_a_set_without_settings_takes_the_experiments(project):
    ps = load_prompt_sets(write_set(project, input="clip.mp4", prompts=PROMPTS), CAMS, project, EXPERIMENT)[0]
    assert ps.settings == EXPERIMENT and ps.num_input_frames == 9
    check_input(ps, CAMS)
    assert [len(v) for v in read_condition_frames(ps, CAMS)] == [9] * 6


def test_a_sets_own_settings_win(project):
    own = {"num_input_frames": 1, "seed": 3, "steps": 4}
    ps = load_prompt_sets(write_set(project, input="clip.mp4", prompts=PROMPTS, **own), CAMS, project, EXPERIMENT)[0]
    assert ps.settings == EXPERIMENT | own and ps.num_input_frames == 1


def test_a_jsonl_line_takes_the_experiments_settings_unless_it_says(project):
    f = write_jsonl(
        project / "batch.jsonl",
        {"prompt": "front", "visual_input": "clip.mp4"},
        {"prompt": "front", "visual_input": "clip.mp4", "num_input_frames": 1, "guidance": 3},
    )
    a, b = load_prompt_sets(f, CAMS, project, EXPERIMENT)
    assert a.settings == EXPERIMENT
    assert b.settings == EXPERIMENT | {"num_input_frames": 1, "guidance": 3}


def test_without_an_experiment_the_schema_defaults_apply(project):
    ps = load_prompt_sets(write_set(project, input="clip.mp4", prompts=PROMPTS), CAMS, project)[0]
    assert ps.settings == DEFAULT_SETTINGS and ps.num_input_frames == 1


# --- upstream's default side-camera prompts ---------------------------------------------------------------------------


def test_a_front_only_yaml_set_gets_upstreams_side_prompts_and_says_so(project):
    ps = load_prompt_sets(write_set(project, input="clip.mp4", prompts={"front": "Ahead."}), CAMS, project)[0]
    assert ps.prompts == {"front": "Ahead."} | UPSTREAM_SIDE_PROMPTS
    assert list(ps.prompts) == CAMS and ps.default_prompt_cameras == SIDES


def test_a_front_only_jsonl_line_gets_upstreams_side_prompts(project):
    f = write_jsonl(project / "b.jsonl", {"prompt": "Ahead.", "visual_input": "clip.mp4"})
    ps = load_prompt_sets(f, CAMS, project)[0]
    assert ps.prompts == {"front": "Ahead."} | UPSTREAM_SIDE_PROMPTS and ps.default_prompt_cameras == SIDES


def test_only_the_side_prompts_not_given_are_filled(project):
    given = {"front": "Ahead.", "left": "Left.", "back_right": "Rear right."}
    ps = load_prompt_sets(write_set(project, input="clip.mp4", prompts=given), CAMS, project)[0]
    assert ps.default_prompt_cameras == ["right", "back", "back_left"]
    assert ps.prompts["left"] == "Left." and ps.prompts["right"] == UPSTREAM_SIDE_PROMPTS["right"]


def test_fewer_cameras_fill_only_theirs(project):
    ps = load_prompt_sets(write_set(project, input="clip.mp4", prompts={"front": "Ahead."}), CAMS[:3], project)[0]
    assert list(ps.prompts) == CAMS[:3] and ps.default_prompt_cameras == ["left", "right"]


def test_the_front_prompt_is_required_and_an_empty_prompt_is_an_error(project):
    f = write_jsonl(project / "b.jsonl", {"prompt_left": "Left.", "visual_input": "clip.mp4"})
    with pytest.raises(PromptSetError, match="line 1: missing or empty prompt for camera 'front'; give prompt$"):
        load_prompt_sets(f, CAMS, project)
    f = write_jsonl(project / "b.jsonl", {"prompt": "Ahead.", "prompt_back": "", "visual_input": "clip.mp4"})
    with pytest.raises(PromptSetError, match="empty prompt for camera 'back'; give prompt_back"):
        load_prompt_sets(f, CAMS, project)


# --- upstream's JSONL and visual_root ---------------------------------------------------------------------------------


def test_jsonl_visual_input_resolves_against_the_visual_root(project):
    """An upstream checkout elsewhere: its batch file runs unchanged with visual_root pointing at that checkout."""
    upstream = project / "cosmos-predict1"
    (upstream / "assets/diffusion").mkdir(parents=True)
    shutil.copy(project / "clip.mp4", upstream / "assets/diffusion/in.mp4")
    f = write_jsonl(project / "sets/b.jsonl", {"prompt": "Ahead.", "visual_input": "assets/diffusion/in.mp4"})
    ps = load_prompt_sets(f, CAMS, project, visual_root=upstream)[0]
    assert ps.input == upstream / "assets/diffusion/in.mp4" and ps.name == "b_0"
    check_input(ps, CAMS)
    with pytest.raises(PromptSetError, match=r"line 1: path '\.\./clip\.mp4' leaves .*cosmos-predict1; use an abs"):
        load_prompt_sets(
            write_jsonl(f, {"prompt": "Ahead.", "visual_input": "../clip.mp4"}), CAMS, project, visual_root=upstream
        )
    absolute = write_jsonl(f, {"prompt": "Ahead.", "visual_input": str(project / "clip.mp4")})
    assert load_prompt_sets(absolute, CAMS, project, visual_root=upstream)[0].input == project / "clip.mp4"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "x"}, "line 1: no visual_input"),
        ({"prompt": "x", "visual_input": "clip.mp4", "negative": "y"}, "line 1: unknown key 'negative'"),
        ({"prompt": "x", "visual_input": "clip.mp4", "num_input_frames": 5}, "num_input_frames must be 1 or 9"),
        ({"prompt": "x", "visual_input": "clip.mp4", "steps": "many"}, "steps must be an integer, got 'many'"),
        ({"prompt": "x", "visual_input": "clip.mp4", "fps": 0}, "fps must be > 0"),
    ],
)
def test_bad_jsonl_lines_are_one_line_errors(project, record, message):
    with pytest.raises(PromptSetError) as e:
        load_prompt_sets(write_jsonl(project / "b.jsonl", record), CAMS, project)
    assert message in str(e.value) and "\n" not in str(e.value) and "b.jsonl" in str(e.value)


# --- which sets an experiment runs: infer.prompt_sets -----------------------------------------------------------------


@pytest.fixture
def repo(project):
    """A repository with prompts/{a,b}.yaml and prompts/batch.jsonl (2 lines), and my_prompts/{c,d}.yaml."""
    (project / "prompts").mkdir()
    for name in ("a", "b"):
        write_set(project / "prompts", name, input="clip.mp4", prompts=PROMPTS)
    write_jsonl(project / "prompts/batch.jsonl", *[{"prompt": "x", "visual_input": "clip.mp4"}] * 2)
    (project / "my_prompts").mkdir()
    for name in ("d", "c"):
        write_set(project / "my_prompts", name, input="clip.mp4", prompts=PROMPTS)
    (project / "my_prompts/notes.txt").write_text("not a set")
    return project


def sets_of(repo, entries):
    return {k: (str(f.relative_to(repo)), i) for k, (f, i) in resolve_prompt_sets(entries, repo, CAMS).items()}


def test_no_list_runs_every_set_in_prompts(repo):
    assert sets_of(repo, None) == {
        "a": ("prompts/a.yaml", 0),
        "b": ("prompts/b.yaml", 0),
        "batch_0": ("prompts/batch.jsonl", 0),
        "batch_1": ("prompts/batch.jsonl", 1),
    }


def test_names_paths_and_globs_in_the_order_listed(repo, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    write_set(elsewhere, "far", input=str(repo / "clip.mp4"), prompts=PROMPTS)
    write_set(elsewhere, "farther", input=str(repo / "clip.mp4"), prompts=PROMPTS)
    entries = ["b", "batch_1", "my_prompts/*.yaml", str(elsewhere / "far.yaml"), str(elsewhere / "farth*.yaml"), "a"]
    got = resolve_prompt_sets(entries, repo, CAMS)
    assert list(got) == ["b", "batch_1", "c", "d", "far", "farther", "a"]
    assert got["batch_1"] == (repo / "prompts/batch.jsonl", 1) and got["far"] == (elsewhere / "far.yaml", 0)
    assert list(sets_of(repo, ["batch"])) == ["batch_0", "batch_1"]  # a JSONL's stem: all its lines


def test_a_set_listed_twice_runs_once(repo):
    assert list(sets_of(repo, ["a", "prompts/a.yaml", "prompts/*.yaml", "batch_0", "batch"])) == [
        "a",
        "b",
        "batch_0",
        "batch_1",
    ]


def check_error(repo, entries, *parts):
    with pytest.raises(PromptSetError) as e:
        resolve_prompt_sets(entries, repo, CAMS, source="experiments/mine.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("experiments/mine.yaml: infer.prompt_sets: entry "), msg
    for part in parts:
        assert part in msg, msg


def test_an_unknown_name_lists_what_exists(repo):
    check_error(repo, ["a", "snowy"], "'snowy'", "no prompt set named 'snowy'", "have: a, b, batch[_<i>]")
    check_error(repo, ["batch_7"], "'batch_7'", "has 2 sets (batch_0 to batch_1)")


def test_a_glob_or_path_matching_nothing(repo):
    check_error(repo, ["nope/*.yaml"], "'nope/*.yaml' matches nothing (relative to", "fix the path or glob")
    check_error(repo, ["my_prompts/*.txt"], "matches no .yaml/.yml/.jsonl file")
    check_error(repo, ["/nowhere/at/all.yaml"], "'/nowhere/at/all.yaml' matches nothing;")
    check_error(repo, ["a.yaml"], "write prompts/a.yaml or the set name a")
    check_error(repo, ["../x/*.yaml"], "'../x/*.yaml' leaves the repository", "absolute path")


def test_two_sets_with_one_name_from_different_files(repo):
    write_set(repo / "my_prompts", "a", input="clip.mp4", prompts=PROMPTS)
    check_error(
        repo,
        ["a", "my_prompts/*.yaml"],
        "two prompt sets are named 'a'",
        str(repo / "prompts/a.yaml"),
        str(repo / "my_prompts/a.yaml"),
        "rename one",
    )


def test_a_broken_set_in_the_list_names_its_file(repo):
    write_set(repo / "my_prompts", "broken", input="clip.mp4", prompts={"left": "no front"})
    with pytest.raises(PromptSetError, match=r"broken\.yaml: missing or empty prompt for camera 'front'"):
        resolve_prompt_sets(["my_prompts/broken.yaml"], repo, CAMS)


# --- inputs -----------------------------------------------------------------------------------------------------------


def test_upstream_clip_gives_the_last_n_frames_of_each_view(project):
    ps = load_prompt_sets(write_set(project, input="clip.mp4", num_input_frames=9, prompts=PROMPTS), CAMS, project)[0]
    check_input(ps, CAMS)
    views = read_condition_frames(ps, CAMS)
    assert [v.shape for v in views] == [(9, 480, 848, 3)] * 6


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompts": {c: p for c, p in PROMPTS.items() if c != "front"}}, "missing or empty prompt for camera 'front'"),
        ({"prompts": PROMPTS | {"back": "  "}}, "missing or empty prompt for camera 'back'; give prompts.back"),
        ({"prompts": PROMPTS | {"roof": "x"}}, "unknown camera 'roof'"),
        ({"prompts": "just text"}, "'prompts' must map camera names to text"),
        ({"input": "nope.mp4"}, "does not exist"),
        ({"input": "../outside.mp4"}, "leaves"),
        ({"num_input_frames": 5}, "num_input_frames must be 1 or 9"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"guidance": -1}, "guidance must be >= 0"),
        ({"steps_count": 3}, "unknown key 'steps_count'"),
        ({"input": {"front": "clip.mp4"}}, "input has no file for camera 'left'"),
    ],
)
def test_bad_prompt_sets_are_one_line_errors(project, change, message):
    d = {"input": "clip.mp4", "num_input_frames": 1, "prompts": PROMPTS} | change
    with pytest.raises(PromptSetError) as e:
        for ps in load_prompt_sets(write_set(project, **d), CAMS, project):
            check_input(ps, CAMS)
    assert message in str(e.value) and "\n" not in str(e.value) and "set.yaml" in str(e.value)


def test_input_too_short_or_not_six_views(project):
    from mvdit.data.video_io import read_video, write_video

    frames, fps = read_video(project / "clip.mp4")
    write_video(project / "short.mp4", frames[:30], fps)  # 5 per view
    write_video(project / "odd.mp4", frames[:31], fps)
    for name, msg in (
        ("short.mp4", "5 frames per view, fewer than num_input_frames=9"),
        ("odd.mp4", "not a multiple of 6"),
    ):
        ps = load_prompt_sets(write_set(project, input=name, num_input_frames=9, prompts=PROMPTS), CAMS, project)[0]
        with pytest.raises(PromptSetError, match=msg):
            check_input(ps, CAMS)


def test_corrupt_input_is_reported_before_models_load(project):
    (project / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    ps = load_prompt_sets(write_set(project, input="bad.mp4", prompts=PROMPTS), CAMS, project)[0]
    with pytest.raises(PromptSetError, match="bad.mp4"):
        check_input(ps, CAMS)


def test_absolute_paths_outside_the_project_are_the_users_choice(project, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(DATA / "video2world_multiview_input1.mp4", other / "c.mp4")
    ps = load_prompt_sets(write_set(project, input=str(other / "c.mp4"), prompts=PROMPTS), CAMS, project)[0]
    check_input(ps, CAMS)
