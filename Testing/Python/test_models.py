"""Networks: shapes, DANet attention semantics, input checks, configs, tiny training steps."""

from __future__ import annotations

import pytest
import torch

from bigl.errors import ConfigError
from bigl.models import (
    AttentionDiscriminator,
    DualAttentionUNet,
    FeatureDiscriminator,
    OutputDiscriminator,
    PatchDiscriminator,
    ResnetGenerator,
    SegmenterConfig,
    SegmenterOutput,
    TranslatorConfig,
    count_parameters,
)
from bigl.models.segmenter import ChannelAttention, PositionAttention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY_SEGMENTER = SegmenterConfig(base_channels=4, depth=3)


@pytest.mark.parametrize(
    "config, size",
    [
        (SegmenterConfig(base_channels=4, depth=3), 32),
        (SegmenterConfig(base_channels=4, depth=2, num_classes=3, in_channels=2), 24),
        (SegmenterConfig(base_channels=2, depth=4, norm="instance", upsample="bilinear", fuse_conv=True), 64),
        (SegmenterConfig(base_channels=3, depth=1, attention_reduction=2, dropout=0.5), 16),
    ],
)
def test_segmenter_shapes(config, size):
    model = DualAttentionUNet(config)
    x = torch.randn(2, config.in_channels, size, size + config.size_multiple)
    logits = model(x)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, config.num_classes, size, size + config.size_multiple)

    out = model(x, return_aux=True)
    assert isinstance(out, SegmenterOutput)
    h, w = size // config.size_multiple, (size + config.size_multiple) // config.size_multiple
    channels = config.base_channels * 2**config.depth
    assert config.bottleneck_channels == channels
    assert out.features.shape == (2, channels, h, w)
    assert out.position_attention.shape == (2, h * w, h * w)
    assert out.channel_attention.shape == (2, channels, channels)
    for attention in (out.position_attention, out.channel_attention):
        assert (attention >= 0).all()
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]))


def test_position_attention_is_identity_at_init_and_matches_definition():
    module = PositionAttention(channels=16, reduction=4)
    x = torch.randn(2, 16, 3, 5)
    out, attention = module(x)
    assert module.gamma.item() == 0
    torch.testing.assert_close(out, x)
    assert attention.shape == (2, 15, 15)
    # with gamma = 1: out_i = x_i + sum_j softmax_j(<q_i, k_j>) v_j, written independently with einsum
    with torch.no_grad():
        module.gamma.fill_(1.0)
    out, attention = module(x)
    q, k, v = (conv(x).flatten(2) for conv in (module.query, module.key, module.value))
    assert q.shape[1] == 4
    expected_attention = torch.softmax(torch.einsum("bci,bcj->bij", q, k), dim=-1)
    expected = x + torch.einsum("bij,bcj->bci", expected_attention, v).reshape_as(x)
    torch.testing.assert_close(attention, expected_attention)
    torch.testing.assert_close(out, expected)


def test_channel_attention_is_identity_at_init_and_favours_dissimilar_channels():
    module = ChannelAttention()
    x = torch.randn(2, 6, 4, 4)
    out, attention = module(x)
    torch.testing.assert_close(out, x)
    # DANet's "max minus energy": A = softmax(-X X^T), the most correlated channel gets the least weight
    flat = x.flatten(2)
    energy = torch.einsum("bin,bjn->bij", flat, flat)
    torch.testing.assert_close(attention, torch.softmax(-energy, dim=-1))
    assert torch.equal(attention.argmin(-1), energy.argmax(-1))
    with torch.no_grad():
        module.gamma.fill_(0.5)
    out, _ = module(x)
    torch.testing.assert_close(out, x + 0.5 * torch.einsum("bij,bjn->bin", attention, flat).reshape_as(x))


def test_dual_attention_block_at_init_is_sum_of_branches():
    model = DualAttentionUNet(TINY_SEGMENTER).eval()
    block = model.attention
    bottleneck = torch.randn(2, TINY_SEGMENTER.bottleneck_channels, 4, 4)
    features, _, _ = block(bottleneck)
    torch.testing.assert_close(features, block.position_branch(bottleneck) + block.channel_branch(bottleneck))


def test_gradient_reaches_attention_gammas():
    model = DualAttentionUNet(TINY_SEGMENTER)
    out = model(torch.randn(2, 1, 32, 32), return_aux=True)
    (out.logits.square().mean() + out.features.mean()).backward()
    for gamma in (model.attention.position.gamma, model.attention.channel.gamma):
        assert gamma.grad is not None and gamma.grad.abs().item() > 0


def test_generator_shapes_and_range():
    configs = [
        (TranslatorConfig(base_channels=4, n_blocks=1), 32),
        (TranslatorConfig(base_channels=4, n_downsample=3, n_blocks=2, upsample="resize"), 16),
    ]
    for config, size in configs:
        generator = ResnetGenerator(config)
        x = 50 * torch.randn(2, 1, size, 2 * size)  # far outside [-1, 1]: the tanh must still bound the output
        y = generator(x)
        assert y.shape == x.shape
        assert y.min() >= -1 and y.max() <= 1
        assert y.std() > 0.01


@pytest.mark.parametrize("size", [16, 24, 32, 64, 128])
def test_discriminators_handle_sizes(size):
    batch = 2
    patch = PatchDiscriminator(in_channels=2, base_channels=4)
    logits = patch(torch.randn(batch, 2, size, size))
    assert logits.shape[:2] == (batch, 1) and min(logits.shape[-2:]) >= 1
    if size >= 32:  # the 70x70 PatchGAN keeps a grid of patch logits
        assert logits.shape[-1] == size // 8 - 2

    feature = FeatureDiscriminator(in_channels=8, base_channels=4)
    assert feature(torch.randn(batch, 8, size // 16, size // 16)).shape == (batch, 1, size // 16, size // 16)

    output = OutputDiscriminator(num_classes=4, base_channels=4)
    probabilities = torch.softmax(torch.randn(batch, 4, size, size), dim=1)
    logits = output(probabilities)
    assert logits.shape == (batch, 1, max(1, size // 32), max(1, size // 32))

    attention = AttentionDiscriminator(size=size, base_channels=4)
    matrix = torch.softmax(torch.randn(batch, size, size), dim=-1)
    logits = attention(matrix)
    assert logits.shape[:2] == (batch, 1) and min(logits.shape[-2:]) >= 1
    torch.testing.assert_close(attention(matrix[:, None]), logits)


@pytest.mark.parametrize("matrix_size", [4, 16, 64, 256])
def test_attention_discriminator_any_matrix_size(matrix_size):
    discriminator = AttentionDiscriminator(size=64, base_channels=4)
    matrix = torch.softmax(torch.randn(3, matrix_size, matrix_size), dim=-1)
    logits = discriminator(matrix)
    assert logits.shape == (3, 1, 4, 4)
    assert torch.isfinite(logits).all()


def test_attention_discriminator_sees_matrices_on_a_size_independent_scale():
    # uniform rows of any size look the same once scaled by M: all ones
    discriminator = AttentionDiscriminator(size=16, base_channels=4)
    small = discriminator(torch.full((1, 16, 16), 1 / 16))
    large = discriminator(torch.full((1, 256, 256), 1 / 256))
    torch.testing.assert_close(small, large)


def test_discriminators_learn_from_gradients():
    discriminator = OutputDiscriminator(num_classes=4, base_channels=4)
    probabilities = torch.softmax(torch.randn(2, 4, 32, 32, requires_grad=True), dim=1)
    discriminator(probabilities).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in discriminator.parameters())


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 1, 30, 32), "multiples of 8"),
        ((2, 1, 32, 36), "multiples of 8"),
        ((2, 3, 32, 32), "1 input channel"),
        ((1, 32, 32), "4D"),
        ((32, 32), "4D"),
    ],
)
def test_segmenter_rejects_bad_inputs(shape, message):
    model = DualAttentionUNet(TINY_SEGMENTER)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape))


def test_other_models_reject_bad_inputs():
    with pytest.raises(ValueError, match="multiples of 4"):
        ResnetGenerator(TranslatorConfig(base_channels=4, n_blocks=1))(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match="floating-point"):
        DualAttentionUNet(TINY_SEGMENTER)(torch.zeros(1, 1, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="4 input channel"):
        OutputDiscriminator(num_classes=4)(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="square attention"):
        AttentionDiscriminator(size=16)(torch.rand(1, 16, 8))
    with pytest.raises(ValueError, match="square attention"):
        AttentionDiscriminator(size=16)(torch.rand(16))
    with pytest.raises(ValueError, match="8 input channel"):
        FeatureDiscriminator(in_channels=8)(torch.rand(1, 4, 2, 2))


@pytest.mark.parametrize("config_type", [SegmenterConfig, TranslatorConfig])
def test_config_round_trip(config_type):
    import json

    default = config_type()
    assert config_type.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    changed = config_type.from_dict({**default.to_dict(), "base_channels": 8})
    assert changed.base_channels == 8 and changed != default


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="n_blocks") as error:
        SegmenterConfig.from_dict({"base_channels": 8, "n_blocks": 3})
    assert "depth" in error.value.hint  # the hint lists the keys that are allowed
    with pytest.raises(ConfigError, match="colour, depht"):
        TranslatorConfig.from_dict({"depht": 1, "colour": 2})
    with pytest.raises(ConfigError, match="depth"):
        SegmenterConfig(depth=0)
    with pytest.raises(ConfigError, match="norm"):
        SegmenterConfig(norm="group")
    with pytest.raises(ConfigError, match="base_channels"):
        TranslatorConfig.from_dict({"base_channels": "32"})
    with pytest.raises(ConfigError, match="dropout"):
        SegmenterConfig(dropout=1.5)


def test_models_keep_their_config_and_rebuild_identically():
    model = DualAttentionUNet(TINY_SEGMENTER)
    rebuilt = DualAttentionUNet(SegmenterConfig.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))
    generator = ResnetGenerator(TranslatorConfig(base_channels=4, n_blocks=1))
    assert generator.config == TranslatorConfig(base_channels=4, n_blocks=1)


def test_count_parameters():
    layer = torch.nn.Conv2d(3, 5, 3)
    assert count_parameters(layer) == 3 * 5 * 9 + 5
    layer.bias.requires_grad_(False)
    assert count_parameters(layer, trainable_only=True) == 3 * 5 * 9
    wider = DualAttentionUNet(SegmenterConfig(base_channels=8, depth=3))
    assert count_parameters(wider) > count_parameters(DualAttentionUNet(TINY_SEGMENTER))


def test_tiny_models_train_one_step_on_cpu():
    """Forward + backward of tiny configs on 2x1x64x64: parameters change, nothing is NaN."""
    segmenter = DualAttentionUNet(TINY_SEGMENTER)
    generator = ResnetGenerator(TranslatorConfig(base_channels=4, n_blocks=1))
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    target = torch.randint(0, 4, (2, 64, 64))
    optimiser = torch.optim.SGD([*segmenter.parameters(), *generator.parameters()], lr=0.1)
    before = {name: p.detach().clone() for name, p in segmenter.named_parameters()}
    out = segmenter(generator(x), return_aux=True)
    loss = torch.nn.functional.cross_entropy(out.logits, target) + out.features.square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in generator.parameters())
    optimiser.step()
    unchanged = {name for name, p in segmenter.named_parameters() if torch.equal(before[name], p)}
    # with gamma = 0 the attended values do not reach the output yet, so only the position attention's
    # query/key/value convs wait for gamma to move; everything else learns from the first step
    waiting = {f"attention.position.{conv}.{kind}" for conv in ("query", "key", "value") for kind in ("weight", "bias")}
    assert unchanged == waiting
    optimiser.zero_grad()
    segmenter(generator(x)).square().mean().backward()
    assert segmenter.attention.position.query.weight.grad.abs().sum() > 0


def test_generator_maps_a_slice_without_brain_to_background():
    generator = ResnetGenerator(TranslatorConfig(base_channels=4, n_blocks=1))
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    x[1] = -1.0  # no brain: instance norm alone would turn this into noise
    y = generator(x)
    assert torch.equal(y[1], torch.full_like(y[1], -1.0))
    assert y[0].std() > 0.01 and y[2].std() > 0.01
