"""Weakly incremental steps end to end: `dvc repro` of the smoke preset with two steps, each
learning one new class of the shape scenes from its images' tags, the second after the first."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline_e2e import COPY_IGNORE, ran_stages, run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = "{step1: {after: student, classes: [stripes]}, step2: {after: step1, classes: [dots]}}"
STEP_STAGES = [f"{stage}@{step}" for step in ("step1", "step2")
               for stage in ("tag_classifier", "pseudo_masks", "step_train")]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, str]:
    """A copy of this working tree after `python -m pipeline.run` with the two steps; its output."""
    repo = tmp_path_factory.mktemp("incremental") / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    run([sys.executable, "-m", "pipeline.compose", "experiment=smoke", f"+incremental.steps={STEPS}"], repo)
    for git in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "s"]):
        run(["git", *git], repo)
    result = run([sys.executable, "-m", "pipeline.run"], repo, timeout=1500)
    return repo, result.stdout + result.stderr


def test_each_step_learns_its_new_class_after_the_model_before_it_and_is_scored_on_old_and_new(chain):
    repo, output = chain
    assert set(STEP_STAGES) <= ran_stages(output)
    step1 = torch.load(repo / "models/step1.pt", map_location="cpu", weights_only=True)
    step2 = torch.load(repo / "models/step2.pt", map_location="cpu", weights_only=True)
    base = ["background", "wire", "blob", "ring", "star"]
    assert step1["classes"] == [*base, "stripes"] and step2["classes"] == [*base, "stripes", "dots"]
    assert step2["state_dict"]["head.weight"].shape[0] == 7
    for step in ("step1", "step2"):
        scores = json.loads((repo / f"reports/incremental/{step}/metrics.json").read_text())
        assert {"old_miou", "new_miou", "all_miou", "per_class_iou"} <= set(scores)
        assert all(0 <= scores[key] <= 1 for key in ("old_miou", "new_miou", "all_miou"))
        masks = json.loads((repo / f"reports/incremental/{step}/pseudo_masks.json").read_text())
        assert masks["held_aside_masks"]  # built-in data: the masks are scored against the held-aside ones


def test_a_change_to_step_training_reruns_the_steps_from_the_first_training_on_and_nothing_before(chain):
    repo, _ = chain
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("    warmup_steps: 1\n", "    warmup_steps: 2\n"))
    # The stages whose own params changed: each step's training (step 2's classifier and masks
    # follow from step 1's new model once it is trained; DVC decides that when it gets there).
    stale = ran_stages(run(["dvc", "repro", "--dry"], repo).stdout)
    assert stale == {"step_train@step1", "step_train@step2"}


def test_with_clip_named_the_steps_classifier_is_clips_text_and_its_masks_clips_scores(chain, clip_dir):
    """Run after the test above (it reads params.yaml as the chain left it). The tag classifier
    trains nothing where CLIP is named: CLIP's text embeddings of the class names are the step's
    classifier, and the initial masks CLIP's scores against them. (DINO at the stage: its ViT-S
    would add ~25 s here; test_step_masks masks with it as the actors receive it.)"""
    repo, _ = chain
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("    clip: null\n", f"    clip: local-dir:{clip_dir[0]}\n"))
    output = run(["dvc", "repro", "pseudo_masks@step1"], repo)
    assert ran_stages(output.stdout + output.stderr) == {"tag_classifier@step1", "pseudo_masks@step1"}
    classifier = torch.load(repo / "models/incremental/step1/tag_classifier.pt", map_location="cpu", weights_only=True)
    assert classifier["kind"] == "clip_text" and classifier["classes"] == ["stripes"]
    assert classifier["state_dict"]["text"].shape == (2, 32)  # stripes and the background prompt, CLIP's width
    assert (repo / "reports/curves/tag_classifier-step1.csv").read_text() == "epoch\n"
    masks = json.loads((repo / "reports/incremental/step1/pseudo_masks.json").read_text())
    assert masks["held_aside_masks"] and set(masks["fused"]["per_class_iou"]) <= {"stripes"}
