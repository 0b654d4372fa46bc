"""Prompt sets: YAML and upstream JSONL, per-camera files and stills, and errors found before any model loads."""

import shutil

import pytest
import yaml

from mvdit.constants import CAMERAS
from mvdit.prompts import PromptSetError, check_input, load_prompt_sets, read_condition_frames

from .conftest import DATA, ROOT


def write_set(tmp_path, **d):
    p = tmp_path / "set.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture
def project(tmp_path):
    shutil.copy(DATA / "video2world_multiview_input1.mp4", tmp_path / "clip.mp4")
    return tmp_path


PROMPTS = {c: f"The camera is facing {c}." for c in CAMERAS}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "prompts").glob("*.yaml")))
def test_shipped_prompt_sets_are_valid(name):
    for ps in load_prompt_sets(ROOT / "prompts" / name, list(CAMERAS), ROOT):
        check_input(ps, list(CAMERAS))
        frames = read_condition_frames(ps, list(CAMERAS))
        assert len(frames) == 6 and all(len(f) == ps.num_input_frames for f in frames)


def test_upstream_jsonl_batch_format_is_accepted(tmp_path):
    src = (DATA / "video2world_multiview.jsonl").read_text().replace("assets/", "")
    (tmp_path / "batch.jsonl").write_text(src.replace('"visual_input": "', '"visual_input": "'))
    shutil.copy(DATA / "video2world_multiview_input1.mp4", tmp_path / "video2world_multiview_input1.mp4")
    import json

    lines = [json.loads(x) for x in src.splitlines() if x.strip()]
    for rec in lines:
        rec["visual_input"] = "video2world_multiview_input1.mp4"
    (tmp_path / "batch.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    sets = load_prompt_sets(tmp_path / "batch.jsonl", list(CAMERAS), tmp_path)
    assert len(sets) == len(lines) and sets[0].name == "batch_0"
    assert sets[0].prompts["left"].startswith("The video is captured from a camera mounted on a car")


def test_upstream_clip_gives_the_last_n_frames_of_each_view(project):
    ps = load_prompt_sets(
        write_set(project, input="clip.mp4", num_input_frames=9, prompts=PROMPTS), list(CAMERAS), project
    )[0]
    check_input(ps, list(CAMERAS))
    views = read_condition_frames(ps, list(CAMERAS))
    assert [v.shape for v in views] == [(9, 480, 848, 3)] * 6


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompts": {c: p for c, p in PROMPTS.items() if c != "back"}}, "missing or empty prompt for camera 'back'"),
        ({"prompts": PROMPTS | {"back": "  "}}, "missing or empty prompt for camera 'back'"),
        ({"prompts": PROMPTS | {"roof": "x"}}, "unknown camera 'roof'"),
        ({"input": "nope.mp4"}, "does not exist"),
        ({"input": "../outside.mp4"}, "leaves the project directory"),
        ({"num_input_frames": 5}, "num_input_frames must be 1 or 9"),
        ({"steps_count": 3}, "unknown key 'steps_count'"),
        ({"input": {"front": "clip.mp4"}}, "input has no file for camera 'left'"),
    ],
)
def test_bad_prompt_sets_are_one_line_errors(project, change, message):
    d = {"input": "clip.mp4", "num_input_frames": 1, "prompts": PROMPTS} | change
    with pytest.raises(PromptSetError) as e:
        for ps in load_prompt_sets(write_set(project, **d), list(CAMERAS), project):
            check_input(ps, list(CAMERAS))
    assert message in str(e.value) and "\n" not in str(e.value) and "set.yaml" in str(e.value)


def test_input_too_short_or_not_six_views(project):
    from mvdit.video_io import read_video, write_video

    frames, fps = read_video(project / "clip.mp4")
    write_video(project / "short.mp4", frames[:30], fps)  # 5 per view
    write_video(project / "odd.mp4", frames[:31], fps)
    for name, msg in (
        ("short.mp4", "5 frames per view, fewer than num_input_frames=9"),
        ("odd.mp4", "not a multiple of 6"),
    ):
        ps = load_prompt_sets(
            write_set(project, input=name, num_input_frames=9, prompts=PROMPTS), list(CAMERAS), project
        )[0]
        with pytest.raises(PromptSetError, match=msg):
            check_input(ps, list(CAMERAS))


def test_corrupt_input_is_reported_before_models_load(project):
    (project / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    ps = load_prompt_sets(write_set(project, input="bad.mp4", prompts=PROMPTS), list(CAMERAS), project)[0]
    with pytest.raises(PromptSetError, match="bad.mp4"):
        check_input(ps, list(CAMERAS))


def test_absolute_paths_outside_the_project_are_the_users_choice(project, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(DATA / "video2world_multiview_input1.mp4", other / "c.mp4")
    ps = load_prompt_sets(write_set(project, input=str(other / "c.mp4"), prompts=PROMPTS), list(CAMERAS), project)[0]
    check_input(ps, list(CAMERAS))
