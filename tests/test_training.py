import pytest
import torch

from pipeline.config import ModelConfig, StudentConfig
from pipeline.dsbn import DualBatchNorm2d, add_auxiliary_bn
from pipeline.training import build_network, student_step

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
])
def test_student_step_gives_finite_losses_that_train(overrides):
    torch.manual_seed(0)
    cfg = StudentConfig(batch_size=2, unlabeled_batch_size=2, hflip=False, **overrides)
    model = build_network(MODEL, 4)
    if cfg.dsbn:
        add_auxiliary_bn(model)
    labeled, pseudo = _data()
    step = student_step(model, labeled, pseudo, cfg, (2, 2), torch.Generator().manual_seed(1), torch.device("cpu"))
    losses = step()
    assert set(losses) == {"loss", "labeled_ce", "pseudo_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_with_dsbn_the_pseudo_labeled_half_goes_through_the_auxiliary_bns():
    cfg = StudentConfig(batch_size=2, unlabeled_batch_size=2, hflip=False)
    model = add_auxiliary_bn(build_network(MODEL, 4)).train()
    labeled, pseudo = _data()
    student_step(model, labeled, pseudo, cfg, (2, 2), torch.Generator().manual_seed(1), torch.device("cpu"))()
    dual = next(m for m in model.modules() if isinstance(m, DualBatchNorm2d))
    assert int(dual.main.num_batches_tracked) == 1 and int(dual.auxiliary.num_batches_tracked) == 1
    assert dual.main_count is None  # routing ends with the step
