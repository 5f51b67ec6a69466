import pytest
import torch

from pipeline.config import ModelConfig, StudentConfig
from pipeline.copy_paste import InstanceBank
from pipeline.dsbn import DualBatchNorm2d, add_auxiliary_bn
from pipeline.models import ProjectedSegmenter, build_network
from pipeline.training import _finetune_optimizer, student_step

MODEL = ModelConfig(preset="tiny", decoder_in_channels=32, decoder_channels=[16, 8, 8, 8])


def _data(n: int = 6, size: int = 32, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)
    masks = torch.randint(0, classes, (n, size, size), generator=g)
    confidence = (torch.rand(n, size, size, generator=g) * 255).to(torch.uint8)
    return (images, masks), (images.clone(), masks.clone(), confidence)


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
    encoder_group, rest_group = _finetune_optimizer(model, cfg).param_groups
    assert encoder_group["lr"] == pytest.approx(0.001) and rest_group["lr"] == pytest.approx(0.01)
    assert {id(p) for p in encoder_group["params"]} == {id(p) for p in net.encoder.parameters()}
    assert len(encoder_group["params"]) + len(rest_group["params"]) == len(list(model.parameters()))
    if projected:
        assert {id(p) for p in model.projection.parameters()} <= {id(p) for p in rest_group["params"]}
