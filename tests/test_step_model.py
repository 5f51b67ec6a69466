import pytest
import torch

from pipeline.config.params import ModelConfig
from pipeline.models.step_model import StepModel, add_classes
from pipeline.models.transunet import build_network

MODEL = ModelConfig(preset="tiny", decoder_in_channels=32, decoder_channels=[16, 8, 8, 8])


def test_new_classes_start_by_sharing_backgrounds_score_and_leave_the_old_classes_as_they_were():
    torch.manual_seed(0)
    net = build_network(MODEL, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x).softmax(1)
        after = add_classes(net, 2)(x).softmax(1)
    assert after.shape[1] == 5
    torch.testing.assert_close(after[:, 1:3], before[:, 1:3])  # old object classes unchanged
    torch.testing.assert_close(after[:, [0, 3, 4]].sum(1), before[:, 0])  # background split three ways
    torch.testing.assert_close(after[:, 3], after[:, 0])


@pytest.mark.parametrize("plugin_channels, embedded", [(8, True), (8, False), (None, False)])
def test_the_step_model_gives_the_plugin_teachers_scores_and_embeddings_only_when_asked(plugin_channels, embedded):
    model = StepModel(add_classes(build_network(MODEL, 3), 2), 2, plugin_channels, embeddings=embedded)
    pixels = torch.tensor([0, 7, 2048 - 1])
    logits, plugin, embeddings = model(torch.randn(2, 3, 32, 32), pixels)
    assert logits.shape == (2, 5, 32, 32)
    assert (plugin is None) == (plugin_channels is None) and (embeddings is None) == (not embedded)
    if plugin is not None:
        assert plugin.shape == (2, 2, 32, 32)
    if embedded:
        assert embeddings.shape == (3, 8)
        torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    # Every weight gets a gradient from the losses that use its outputs (DDP requires it).
    loss = logits.sum() + (plugin.sum() if plugin is not None else 0) + (embeddings.sum() if embedded else 0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert set(model.state_dict()) >= {f"net.{k}" for k in build_network(MODEL, 5).state_dict()}
