import torch

from pipeline.config.params import ModelConfig
from pipeline.models.dsbn import DualBatchNorm2d, add_auxiliary_bn, main_bn_state, main_samples_first
from pipeline.models.transunet import build_network

MODEL = ModelConfig(preset="tiny", decoder_in_channels=32, decoder_channels=[16, 8, 8, 8])


def _networks():
    torch.manual_seed(0)
    plain = build_network(MODEL, 4)
    dual = build_network(MODEL, 4)
    dual.load_state_dict(plain.state_dict())
    return plain, add_auxiliary_bn(dual)


def test_every_batchnorm_gets_a_twin_with_the_same_start():
    plain, dual = _networks()
    bns = [m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    duals = [m for m in dual.modules() if isinstance(m, DualBatchNorm2d)]
    assert len(duals) == len(bns) > 0
    for d in duals:
        torch.testing.assert_close(d.main.running_mean, d.auxiliary.running_mean)
        torch.testing.assert_close(d.main.weight, d.auxiliary.weight)


def test_running_statistics_diverge_when_trained_on_two_distributions():
    _, dual = _networks()
    dual.train()
    clean, strong = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32) * 4 - 3
    with main_samples_first(dual, 4):
        dual(torch.cat([clean, strong]))
    d = next(m for m in dual.modules() if isinstance(m, DualBatchNorm2d))
    assert not torch.allclose(d.main.running_mean, d.auxiliary.running_mean)
    assert not torch.allclose(d.main.running_var, d.auxiliary.running_var)


def test_without_the_routing_block_every_sample_uses_the_main_bn():
    _, dual = _networks()
    dual.train()
    dual(torch.rand(2, 3, 32, 32))
    d = next(m for m in dual.modules() if isinstance(m, DualBatchNorm2d))
    assert d.main_count is None and int(d.auxiliary.num_batches_tracked) == 0


def test_eval_output_ignores_the_auxiliary_bn_and_the_export_is_the_plain_network():
    plain, dual = _networks()
    dual.train()
    with main_samples_first(dual, 2):
        dual(torch.rand(4, 3, 32, 32))
    dual.eval()
    x = torch.rand(2, 3, 32, 32)
    before = dual(x)
    for d in (m for m in dual.modules() if isinstance(m, DualBatchNorm2d)):
        d.auxiliary.weight.data.mul_(5.0)
        d.auxiliary.running_mean.add_(3.0)
    torch.testing.assert_close(dual(x), before)
    plain.load_state_dict(main_bn_state(dual.state_dict()))  # strict: same keys as the plain network
    torch.testing.assert_close(plain.eval()(x), before)


def test_main_bn_state_leaves_a_plain_state_alone():
    plain, _ = _networks()
    assert main_bn_state(plain.state_dict()).keys() == plain.state_dict().keys()
