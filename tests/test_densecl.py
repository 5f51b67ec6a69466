import torch

from pipeline.models.checkpoints import encoder_weights
from pipeline.config.params import DenseCLConfig
from pipeline.models.densecl import DenseCL, dense_correspondence
from pipeline.models.transunet import ENCODER_PRESETS


def test_correspondence_finds_the_same_feature_wherever_it_moved():
    query = torch.randn(2, 16, 3, 3)
    order = torch.randperm(9)
    key = query.flatten(2)[:, :, order].reshape(2, 16, 3, 3)  # the same features, shuffled
    matched = dense_correspondence(query, key)
    expected = torch.argsort(order).expand(2, -1)  # query location i now sits at key index order⁻¹(i)
    assert torch.equal(matched, expected)


def _model(**cfg) -> DenseCL:
    torch.manual_seed(0)
    return DenseCL(ENCODER_PRESETS["tiny"], DenseCLConfig(queue_size=8, **cfg))


def test_a_step_trains_the_query_branch_and_moves_the_key_branch_by_momentum():
    model = _model(momentum=0.9)
    views = torch.randn(2, 4, 3, 64, 64)
    key_before = [p.clone() for p in model.key_encoder.parameters()]
    losses = model(views[0], views[1])
    assert set(losses) == {"loss", "global_loss", "dense_loss"}
    torch.testing.assert_close(losses["loss"], 0.5 * losses["global_loss"] + 0.5 * losses["dense_loss"])
    losses["loss"].backward()
    assert all(p.grad is None for p in model.key_encoder.parameters())
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model(views[0], views[1])  # the next step's momentum update: key = 0.9 key + 0.1 query
    for before, key, query in zip(key_before, model.key_encoder.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(key, 0.9 * before + 0.1 * query)


def test_queue_is_a_ring_of_normalised_keys():
    model = _model()
    views = torch.randn(2, 6, 3, 64, 64)
    model(views[0], views[1])
    model(views[0], views[1])  # 12 keys into 8 slots: wraps around
    assert int(model.queue_position) == 12 % 8
    torch.testing.assert_close(model.global_queue.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(model.dense_queue.norm(dim=1), torch.ones(8))


def test_exported_weights_are_the_query_encoder():
    model = _model()
    weights = encoder_weights(model.state_dict())
    assert weights.keys() == model.encoder.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.encoder.state_dict().items())
