"""Skip dropout (synth.unet_split.SkipDropout): the training-time forward that makes the bottleneck carry the class."""
import pytest
import torch

from clsp.errors import UserError
from clsp.synth.ddpm import build_scheduler, diffusion_loss
from clsp.synth.diffusion_train import DiffusionTrainConfig
from clsp.synth.unet_split import SkipDropout, decode, embed_time, encode
from clsp.synth.untrained_unets import tiny_unet


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 8, 8, generator=g), torch.tensor([5, 400, 900])  # x (B, C, H, W), t (B,)


def test_rows_that_keep_their_skips_get_the_plain_forward(batch):
    unet, (x, t) = tiny_unet(sample_size=8), batch
    with torch.no_grad():
        for fill in ("zero", "shuffle"):
            out = SkipDropout(unet, fill)(x, t, torch.tensor([True, True, True]))
            assert torch.equal(out, unet(x, t).sample)


@pytest.mark.parametrize("fill", ["zero", "shuffle"])
def test_a_dropped_row_loses_only_its_low_resolution_skips(batch, fill):
    unet, (x, t) = tiny_unet(sample_size=8), batch
    with torch.no_grad():
        out = SkipDropout(unet, fill)(x, t, torch.tensor([True, False, True]))
        temb = embed_time(unet, t, 3)
        h, skips = encode(unet, x, t, temb=temb)
        # row 1 by hand: full-resolution skips its own, the others zero or row 0's (the batch rolled by one)
        replace = (lambda s: torch.zeros_like(s[1:2])) if fill == "zero" else (lambda s: s[0:1])
        mine = tuple(s[1:2] if s.shape[-1] == 8 else replace(s) for s in skips)
        expected = decode(unet, h[1:2], mine, temb[1:2], t[1:2])
        assert any(s.shape[-1] < 8 for s in skips)  # the test UNet has low-resolution skips to drop
        assert torch.allclose(out[1:2], expected, atol=1e-6)
        assert torch.allclose(out[0], unet(x, t).sample[0], atol=1e-6)  # rows that keep theirs are untouched
        assert not torch.allclose(out[1], unet(x, t).sample[1], atol=1e-4)


def test_the_loss_trains_through_the_wrapper_and_reaches_the_unet_weights(batch):
    unet, (x, t) = tiny_unet(sample_size=8), batch
    wrapped = SkipDropout(unet, "shuffle").train()
    scheduler = build_scheduler(DiffusionTrainConfig(out="unused"))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([False, True, False])
    loss = diffusion_loss(wrapped, scheduler, x.clamp(-1, 1), noise, t, skip_keep=keep)
    by_hand = (wrapped(scheduler.add_noise(x.clamp(-1, 1), noise, t), t, keep) - noise).pow(2).mean()
    torch.testing.assert_close(loss, by_hand)  # the rows' keep flags reach the wrapper...
    assert not torch.isclose(loss, diffusion_loss(unet, scheduler, x.clamp(-1, 1), noise, t))  # ...and drop skips
    loss.backward()
    assert all(p.grad is not None for p in unet.down_blocks.parameters() if p.requires_grad)


@pytest.mark.parametrize("options, problem", [({"skip_dropout": 1.0}, "skip_dropout = 1.0"),
                                              ({"skip_fill": "noise"}, "skip_fill 'noise'")])
def test_bad_skip_dropout_settings_are_refused(options, problem):
    with pytest.raises(UserError, match=problem):
        DiffusionTrainConfig(out="unused", **options)
