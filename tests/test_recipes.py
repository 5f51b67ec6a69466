import time

import pytest
import torch

from pipeline.config.params import (
    DecoderPretrainConfig,
    EncoderConfig,
    FinetuneConfig,
    ModelConfig,
    StepTrainConfig,
    StudentConfig,
)
from pipeline.data.copy_paste import InstanceBank
from pipeline.models.dsbn import DualBatchNorm2d, add_auxiliary_bn
from pipeline.models.transunet import ProjectedSegmenter, build_network
from pipeline.tools.plain import plain_setup
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import (
    Classified,
    DecoderPretrain,
    EncoderClassify,
    EncoderDenseCL,
    Images,
    Labeled,
    LearnStep,
    StepMasked,
    TagClassify,
    Tagged,
    Teacher,
    _finetune_optimizer,
)
from pipeline.train.steps import student_step

MODEL = ModelConfig(preset="tiny", decoder_in_channels=32, decoder_channels=[16, 8, 8, 8])


def _data(n: int = 6, size: int = 32, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)
    masks = torch.randint(0, classes, (n, size, size), generator=g)
    confidence = (torch.rand(n, size, size, generator=g) * 255).to(torch.uint8)
    return (images, masks), (images.clone(), masks.clone(), confidence)


def _recipe_parts(recipe: str, device: torch.device):
    """`recipe`'s network, optimizer and step on small random data, on `device`."""
    (images, masks), _ = _data()
    denoiser = build_network(MODEL, 3).state_dict()
    encoder = {k[len("encoder."):]: v for k, v in denoiser.items() if k.startswith("encoder.")}
    jobs = {"encoder_classify": (EncoderClassify(()), EncoderConfig(batch_size=2),
                                 {"classify": Classified(images, masks[:, 0, 0])}, {}),
            "encoder_densecl": (EncoderDenseCL(()), EncoderConfig(batch_size=2), {"images": Images(images)}, {}),
            "decoder_pretrain": (DecoderPretrain(()), DecoderPretrainConfig(batch_size=2), {"images": Images(images)},
                                 {"init_state": encoder}),
            "teacher": (Teacher(()), FinetuneConfig(batch_size=2), {"labeled": Labeled(images, masks)},
                        {"init_state": denoiser, "init_from_denoiser": True}),
            "tag_classify": (TagClassify((), first_class=2), FinetuneConfig(batch_size=2),
                             {"tagged": Tagged(images, masks[:, :2, 0] + 2)}, {"init_state": encoder}),
            # The dense contrast reads values (which meta tensors have none of): tested on the CPU below.
            "learn_step": (LearnStep((), (), first_class=2),
                           StepTrainConfig(batch_size=2, warmup_steps=0, dense_contrast_weight=0.0,
                                           copy_paste_probability=1.0, plugin_channels=8),
                           {"masks": StepMasked(images, torch.stack([masks == 2, masks == 3], 1).to(torch.uint8)),
                            "labeled": Labeled(images, torch.where(masks >= 2, 0, masks).to(torch.uint8))},
                           {"init_state": build_network(MODEL, 2).state_dict()})}
    made, train, rows, init = jobs[recipe]
    job = JobConfig(train=train, model=MODEL, num_classes=4, **init)
    return made.build(job, plain_setup(job, device), **rows)


RECIPES = ["encoder_classify", "encoder_densecl", "decoder_pretrain", "teacher", "tag_classify", "learn_step"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_step_keeps_its_batch_on_the_models_device(recipe):
    """On a GPU the batch moves before it is augmented, and every draw from the host generator
    follows it there. On the meta device any host tensor that meets the batch raises, so this
    runs each step's forward and backward there. (The student's losses read values, which meta
    tensors have none of.)"""
    parts = _recipe_parts(recipe, torch.device("meta"))
    loss = next(iter(parts.step().values()))
    loss.backward()
    assert loss.device.type == "meta"
    assert all(p.grad is None or p.grad.device.type == "meta" for p in parts.model.parameters())


@pytest.mark.parametrize("recipe", RECIPES)
def test_on_the_cpu_each_stage_steps_with_the_fused_adamw(recipe):
    """One kernel over every tensor (the per-tensor loop costs ~5% of a teacher step here);
    the meta device above, which has no fused kernel, gets the plain loop."""
    parts = _recipe_parts(recipe, torch.device("cpu"))
    assert parts.optimizer.defaults["fused"]
    trained = [p for group in parts.optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in trained]
    next(iter(parts.step().values())).backward()
    parts.optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))


@pytest.mark.parametrize("overrides", [
    {},  # the default recipe: strong view, DSBN, self-correction
    {"strong_augment": False, "dsbn": False, "pseudo_loss": "ce"},  # plain CE on pseudo-labels
    {"confidence_weighting": True, "conf_threshold": 0.5},
    {"copy_paste_probability": 1.0, "dense_contrast_weight": 0.1},  # every optional piece on
])
def test_student_step_gives_finite_losses_that_train(overrides):
    torch.manual_seed(0)
    cfg = StudentConfig(batch_size=2, unlabeled_batch_size=2, hflip=False, **overrides)
    net = build_network(MODEL, 4)
    model = ProjectedSegmenter(net, 8) if cfg.dense_contrast_weight else net
    if cfg.dsbn:
        add_auxiliary_bn(model)
    labeled, pseudo = _data()
    bank = (InstanceBank(*labeled, 4, 8, torch.Generator().manual_seed(0), frozenset({0}))
            if cfg.copy_paste_probability else None)
    step = student_step(model, labeled, pseudo, cfg, (2, 2), torch.Generator().manual_seed(1), torch.device("cpu"),
                        bank)
    losses = step()
    expected = {"loss", "labeled_ce", "pseudo_loss"} | ({"dense_contrast"} if cfg.dense_contrast_weight else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0



@pytest.mark.parametrize("overrides, expected", [
    ({}, {"loss", "segmentation", "plugin", "dense_contrast"}),  # FMWISS's every piece
    ({"plugin_teacher": False, "distill": False, "copy_paste_probability": 0.0}, {"loss", "segmentation"}),  # the floor
])
def test_an_incremental_step_trains_the_new_model_and_never_the_one_before(overrides, expected):
    torch.manual_seed(0)
    (images, masks), _ = _data()
    job = JobConfig(train=StepTrainConfig(batch_size=2, warmup_steps=1, plugin_channels=8, **overrides), model=MODEL,
                    num_classes=4, init_state=build_network(MODEL, 2).state_dict())
    new = torch.stack([masks == 2, masks == 3], 1).to(torch.uint8)
    parts = LearnStep((), (), first_class=2).build(job, plain_setup(job, torch.device("cpu")),
                                                  masks=StepMasked(images, new),
                                                  labeled=Labeled(images, torch.where(masks >= 2, 0, masks).to(torch.uint8)))
    before = {k: v.clone() for k, v in job.init_state.items()}
    for _ in range(3):  # the third after the warm-up: the plug-in teacher's targets
        losses = parts.step()
        assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
        parts.optimizer.zero_grad()
        losses["loss"].backward()
        parts.optimizer.step()
    assert parts.model.net.head.out_channels == 4
    assert all(torch.equal(before[k], v) for k, v in job.init_state.items())  # the model before, untouched

def test_with_dsbn_the_pseudo_labeled_half_goes_through_the_auxiliary_bns():
    cfg = StudentConfig(batch_size=2, unlabeled_batch_size=2, hflip=False)
    model = add_auxiliary_bn(build_network(MODEL, 4)).train()
    labeled, pseudo = _data()
    student_step(model, labeled, pseudo, cfg, (2, 2), torch.Generator().manual_seed(1), torch.device("cpu"))()
    dual = next(m for m in model.modules() if isinstance(m, DualBatchNorm2d))
    assert int(dual.main.num_batches_tracked) == 1 and int(dual.auxiliary.num_batches_tracked) == 1
    assert dual.main_count is None  # routing ends with the step


@pytest.mark.parametrize("projected", [False, True])
def test_finetune_optimizer_slows_the_encoder_and_trains_everything_else_once(projected):
    net = build_network(MODEL, 4)
    model = ProjectedSegmenter(net, 8) if projected else net
    cfg = StudentConfig(lr=0.01, encoder_lr_scale=0.1)
    encoder_group, rest_group = _finetune_optimizer(model, cfg, torch.device("cpu")).param_groups
    assert encoder_group["lr"] == pytest.approx(0.001) and rest_group["lr"] == pytest.approx(0.01)
    assert {id(p) for p in encoder_group["params"]} == {id(p) for p in net.encoder.parameters()}
    assert len(encoder_group["params"]) + len(rest_group["params"]) == len(list(model.parameters()))
    if projected:
        assert {id(p) for p in model.projection.parameters()} <= {id(p) for p in rest_group["params"]}


@pytest.fixture
def labeled_split(tmp_path):
    import numpy as np

    from pipeline.data.shards import SEGMENTATION_SCHEMA, write_shards
    from pipeline.data.png import encode_png

    rng = np.random.default_rng(0)
    rows = [{"id": f"img{i}", "image": encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
             "mask": encode_png(rng.integers(0, 4, (32, 32), dtype=np.uint8))} for i in range(7)]
    write_shards(rows, SEGMENTATION_SCHEMA, tmp_path / "labeled", 4)
    return tmp_path / "labeled"


@pytest.mark.slow
def test_the_plain_baseline_trains_exactly_what_the_ray_train_job_trains(labeled_split, tmp_path):
    """The benchmark's ratio compares like with like: `pipeline.tools.plain` runs the same recipe on the same
    data with the same seeds and threads, so the weights come out bit-identical."""
    import ray

    from pipeline.config.params import RayConfig, TeacherConfig
    from pipeline.tools.plain import plain_launch
    from pipeline.train.launch import job_phases, launch

    torch.manual_seed(0)
    job = JobConfig(train=TeacherConfig(epochs=2, steps_per_epoch=2, batch_size=2), model=MODEL, num_classes=4,
                    init_state=build_network(MODEL, 4).state_dict(), cpus_per_worker=1)
    ray_cfg = RayConfig(cpus_per_worker=1, storage_path=str(tmp_path / "ray"))
    recipe = Teacher(labeled=(labeled_split,))
    plain_state, plain_metrics = plain_launch("teacher_finetune", recipe, job, ray_cfg, [labeled_split])
    try:
        launched_at = time.time()
        ray_state, ray_metrics = launch("teacher_finetune", recipe, job, ray_cfg, [labeled_split])
        returned_at = time.time()
        # On the Ray a stage starts for itself, Ray Train starts no preemption watcher (one machine).
        actor_classes = {actor["ActorClassName"] for actor in ray._private.state.actors().values()}
        assert "RayTrainWorker" in actor_classes and "PreemptionWatcher" not in actor_classes, actor_classes
    finally:
        ray.shutdown()
    # The overhead's phases and the loop account for the whole job, each phase in its place.
    phases = job_phases(launched_at, ray_metrics, returned_at)
    assert all(seconds >= 0 for seconds in phases.values()), phases
    assert sum(phases.values()) + ray_metrics["loop_seconds"] == pytest.approx(returned_at - launched_at, abs=0.05)
    assert phases["job_start_s"] > 1  # Ray Train's controller and worker group: seconds, not nothing
    assert job_phases(returned_at, ray_metrics, returned_at + 1) == {}  # a relaunch that trained nothing itself
    assert plain_state["model"].keys() == ray_state["model"].keys()
    assert all(torch.equal(plain_state["model"][k], ray_state["model"][k]) for k in plain_state["model"])
    assert plain_metrics["loop_seconds"] > 0 and plain_metrics["data_seconds"] >= 0
    assert ray_metrics["data_seconds"] > 0 and ray_metrics["worker_peak_rss_mb"] > 100


def test_a_stage_driver_never_imports_the_models():
    """timm and torchvision take seconds to import; a stage's driver only launches its Ray job
    (training, or batch inference's model replicas) and writes its outputs, so the imports happen
    in the Ray workers and actors alone."""
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "for name in ['encoder_init', 'decoder_pretrain', 'teacher_finetune', 'student_train', 'pseudo_label',\n"
            "             'evaluate']:\n"
            "    sys.argv = [name, '--help']\n"
            "    try:\n"
            "        runpy.run_path(f'stages/{name}.py', run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "import pipeline.orchestrate.training, pipeline.train.launch, pipeline.train.recipes, pipeline.models.checkpoints\n"
            "import pipeline.infer.batch\n"
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("classes", [3, 5])
def test_a_denoisers_head_never_becomes_the_class_head_even_with_three_classes(classes):
    """The denoising head predicts noise for 3 image channels; a 3-class teacher must not keep it."""
    from pipeline.train.recipes import _segmenter_from

    denoiser = build_network(MODEL, 3).state_dict()
    job = JobConfig(train=FinetuneConfig(), model=MODEL, num_classes=classes, init_state=denoiser,
                    init_from_denoiser=True)
    net = _segmenter_from(job).state_dict()
    assert net["head.weight"].shape[0] == classes
    assert not (net["head.weight"].shape == denoiser["head.weight"].shape
                and torch.equal(net["head.weight"], denoiser["head.weight"]))
    assert torch.equal(net["decoder.conv_more.0.weight"], denoiser["decoder.conv_more.0.weight"])  # the rest is kept


def test_a_tag_classifier_learns_which_images_show_a_class_and_where():
    """Images tagged with class 5 show a bright square, somewhere; the others do not. After a
    short training the classifier tells them apart, and the class's activation map is higher
    inside the square than outside it."""
    from pipeline.models.tag_masks import activation_maps

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(16, 3, 64, 64, generator=g) * 80).to(torch.uint8)
    tags = torch.full((16, 1), -1)
    corners = torch.randint(0, 40, (16, 2), generator=g)
    for n in range(0, 16, 2):  # every other image shows the class
        y, x = corners[n].tolist()
        images[n, :, y:y + 24, x:x + 24] = 255
        tags[n, 0] = 5
    encoder = {k[len("encoder."):]: v for k, v in build_network(MODEL, 3).state_dict().items()
               if k.startswith("encoder.")}
    job = JobConfig(train=FinetuneConfig(batch_size=8, lr=3e-3, encoder_lr_scale=1.0, crop_scale_min=1.0, hflip=False),
                    model=MODEL, num_classes=1, init_state=encoder)
    parts = TagClassify((), first_class=5).build(job, plain_setup(job, torch.device("cpu")),
                                                 tagged=Tagged(images, tags))
    for _ in range(60):
        parts.optimizer.zero_grad()
        parts.step()["loss"].backward()
        parts.optimizer.step()
    model = parts.model.eval()
    with torch.no_grad():
        logits, maps = model(images.float() / 127.5 - 1)
    assert ((logits[:, 0] > 0) == (tags[:, 0] == 5)).all()
    cams = activation_maps(maps, torch.ones(16, 1, dtype=torch.bool), (64, 64))
    for n in range(0, 16, 2):
        y, x = corners[n].tolist()
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[y:y + 24, x:x + 24] = True
        assert cams[n, 0][inside].mean() > cams[n, 0][~inside].mean()
