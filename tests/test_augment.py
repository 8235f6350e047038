"""BatchAugment: shapes, dtype, range, per-sample randomness, seeding, recipes, the crop's geometry, the jitter's
order and gate, no host reads, and agreement with the PIL reference."""
import numpy as np
import pytest
import torch
from conftest import host_traffic
from PIL import Image

from clsp.train.augment import _COLOUR_STEPS, _COLUMNS, PARAMS, BatchAugment, EvalTransform, colour_jitter, \
    crop_and_flip, to_unit_float
from clsp.train.pil_augment import pil_reference


def digit_like_batch(b=16, size=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)  # (B, H, W, 3)


@pytest.mark.parametrize("recipe", ["simclr", "moco"])
def test_uint8_and_float_inputs_give_normalised_batches(recipe):
    images = digit_like_batch()
    augment = BatchAugment(recipe, size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = augment(images)
    assert out.shape == (16, 3, 8, 8) and out.dtype == torch.float32
    assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5  # [0, 1] mapped to [-1, 1]
    assert not out.requires_grad
    torch.manual_seed(1)
    from_bytes = augment(images)
    torch.manual_seed(1)
    from_floats = augment(images.permute(0, 3, 1, 2).float() / 255)  # (B, 3, H, W) in [0, 1]: the same batch
    torch.testing.assert_close(from_floats, from_bytes, rtol=0, atol=1e-5)


def test_each_sample_gets_its_own_augmentation():
    one = digit_like_batch(1).expand(32, -1, -1, -1)  # 32 copies of one image
    out = BatchAugment("simclr", size=12)(one)
    distinct = {tuple(row.flatten()[:50].tolist()) for row in out}
    assert len(distinct) > 28  # a few may coincide only by chance of both no-ops


def test_seeded_runs_repeat_and_unseeded_differ():
    images, augment = digit_like_batch(), BatchAugment("moco", size=10)
    torch.manual_seed(123)
    first = augment(images)
    torch.manual_seed(123)
    assert torch.equal(augment(images), first)
    assert not torch.equal(augment(images), first)


def test_recipe_and_input_validation():
    with pytest.raises(ValueError, match="unknown augmentation recipe"):
        BatchAugment("randaugment", size=8)
    with pytest.raises(ValueError, match="mean and std"):
        BatchAugment("simclr", size=8, std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        BatchAugment("simclr", size=8)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float"):
        to_unit_float(torch.zeros(2, 8, 8, 3, dtype=torch.int32))


def test_eval_transform_is_deterministic_normalisation():
    images = digit_like_batch(4, size=8)
    out = EvalTransform(8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(images)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert torch.allclose(out, expected, atol=1e-6)
    assert EvalTransform(16)(images).shape == (4, 3, 16, 16)


def test_eval_transform_keeps_images_on_their_device():
    # It used to move the images to its constants' device (the CPU), so a GPU backbone got CPU inputs (found on an
    # H100). 'meta' stands in for a second device here: its tensors cannot be copied to the CPU.
    out = EvalTransform(16)(digit_like_batch(4, size=8).to("meta"))
    assert out.device.type == "meta" and out.shape == (4, 3, 16, 16)


@pytest.mark.parametrize("recipe,view", [("simclr", 0), ("moco", 0), ("byol", 0), ("byol", 1)])
def test_batch_and_pil_pipelines_agree_in_distribution(recipe, view):
    # the same image augmented 256 times by each pipeline: per-channel mean and spread must be close
    g = np.random.default_rng(0)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[4:12, 6:10] = (230, 180, 40)  # a coloured bar on black, like a digit stroke
    image += g.integers(0, 20, image.shape, dtype=np.uint8)
    torch.manual_seed(0)
    batch = BatchAugment(recipe, size=16)(torch.from_numpy(image)[None].expand(256, -1, -1, -1), view=view)
    reference = pil_reference(recipe, 16, view=view)
    pil = torch.stack([reference(Image.fromarray(image)) for _ in range(256)])  # (256, 3, 16, 16)
    assert pil.shape == batch.shape
    assert torch.allclose(batch.mean(dim=(0, 2, 3)), pil.mean(dim=(0, 2, 3)), atol=0.08)
    assert torch.allclose(batch.std(dim=(0, 2, 3)), pil.std(dim=(0, 2, 3)), rtol=0.15)


def uniforms(b, **columns):
    """A sample's uniforms (B, PARAMS) split by column, with the named columns set (a float or a (B, n) tensor)."""
    u = dict(zip(_COLUMNS, torch.full((b, PARAMS), 0.5).split(list(_COLUMNS.values()), dim=1)))
    return {name: (column if name not in columns else torch.as_tensor(columns[name]).expand_as(column).clone())
            for name, column in u.items()}


def test_crop_takes_the_box_torchvision_would_and_resamples_it_exactly():
    x = torch.rand(3, 3, 12, 16)  # (B, 3, H, W)
    ratio_one = 0.5  # log-ratio column: the middle of [log 3/4, log 4/3] is ratio 1
    # area 0.25 x 12 x 16 = 48 at ratio 1: w = h = round(6.93) = 7; top and left at floor(u x (room + 1))
    u = uniforms(3, area=(0.25 - 0.08) / 0.92, log_ratio=ratio_one, top=torch.tensor([[0.0], [0.99], [0.5]]),
                 left=torch.tensor([[0.0], [0.99], [0.3]]), flip=0.9)
    out = crop_and_flip(x, u, size=7)  # a 7 x 7 box at 7 px: pixel centres fall on pixel centres
    for i, (top, left) in enumerate([(0, 0), (12 - 7, 16 - 7), (3, 3)]):  # floor(0.5 * 6) = 3, floor(0.3 * 10) = 3
        assert torch.allclose(out[i], x[i, :, top:top + 7, left:left + 7], atol=1e-5), i
    flipped = crop_and_flip(x, {**u, "flip": torch.zeros(3, 1)}, size=7)
    assert torch.allclose(flipped, out.flip(-1), atol=1e-5)  # a flip mirrors within the box


def test_crop_falls_back_to_the_centred_box_when_no_try_fits():
    x = torch.rand(2, 3, 8, 8)
    none_fit = uniforms(2, area=1.0, log_ratio=1.0)  # whole area at ratio 4/3: wider than the image, ten times
    assert torch.allclose(crop_and_flip(x, {**none_fit, "flip": torch.ones(2, 1)}, size=8), x, atol=1e-5)
    tall = torch.rand(1, 3, 20, 8)  # narrower than 3/4: the fallback keeps the width, height round(8 / 0.75) = 11
    out = crop_and_flip(tall, {**uniforms(1, area=1.0, log_ratio=1.0), "flip": torch.ones(1, 1)}, size=8)
    expected = torch.nn.functional.interpolate(tall[:, :, 4:15], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)


def test_jitter_applies_its_steps_in_the_order_given_to_the_samples_drawn_for_it():
    x = torch.rand(3, 3, 6, 6)
    factors = torch.tensor([[0.9, 0.2, 0.7, 0.95]]).expand(3, 4)  # strong contrast, some hue: the order matters
    u = uniforms(3, jitter=torch.tensor([[0.0], [0.5], [0.9]]), factors=factors)  # JITTER_P 0.8: the third skips
    values = [0.6 + 0.9 * 0.8, 0.6 + 0.2 * 0.8, 0.6 + 0.7 * 0.8, -0.1 + 0.95 * 0.2]  # the factors in their ranges
    outputs = []
    for order in ((0, 1, 2, 3), (3, 2, 1, 0)):
        out = colour_jitter(x, u, (0.4, 0.4, 0.4, 0.1), order)
        expected = x[:2]
        for step in order:
            expected = _COLOUR_STEPS[step](expected, torch.tensor([values[step]]))
        assert torch.allclose(out[:2], expected, atol=1e-5), order
        assert torch.equal(out[2], x[2])  # not drawn for the jitter: untouched
        outputs.append(out)
    assert not torch.allclose(outputs[0][:2], outputs[1][:2])  # the two orders differ on the same images


@pytest.mark.parametrize("recipe", ["simclr", "moco", "byol"])
def test_augmentation_never_waits_for_the_device(recipe):
    # On a GPU a host read (kornia's modules made several per call) makes the host wait for the device at every
    # augmented view; the meta device stands in for it (tests/conftest.host_traffic).
    augment = BatchAugment(recipe, size=16).to("meta")
    images = digit_like_batch(8, size=12).to("meta")
    with host_traffic() as seen:
        out = augment(images)
        augment(to_unit_float(images), view=1)
    assert seen == [] and out.shape == (8, 3, 16, 16)


@pytest.mark.parametrize("recipe", ["simclr", "moco", "byol"])
def test_compiled_stages_give_the_eager_views_and_compile_once_per_colour_step_not_per_order(recipe):
    """What `--compile` does to the augmentation on a GPU (inductor there); aot_eager traces the stages the same way
    on the CPU (dynamo, fullgraph: a graph break fails) and runs the traced graphs with eager kernels."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs compiled earlier in this process (the other recipe's) would be reused
    images = digit_like_batch(8, size=12)
    eager, compiled = BatchAugment(recipe, size=10), BatchAugment(recipe, size=10).compile_stages("aot_eager")
    before, graphs, orders = counters["stats"]["unique_graphs"], [], set()
    for call in range(12):  # 12 batches: 8 or more of the 24 jitter orders (asserted below)
        torch.manual_seed(call)
        orders.add(tuple(torch.randperm(4).tolist()))  # the order forward draws after this seed (host generator)
        torch.manual_seed(call)
        want = eager(images, view=call % 2)  # the two views alternate, as in a step
        torch.manual_seed(call)
        torch.testing.assert_close(compiled(images, view=call % 2), want, rtol=0, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert len(orders) >= 8
    # crop, four colour steps (every batch uses all four), the last steps; BYOL's last steps twice, as its two views
    # solarize with other probabilities (0 and 0.2)
    assert graphs[0] == 6 and graphs[-1] == 6 + (recipe == "byol")


def solarized_share(augment: BatchAugment, view: int) -> float:
    """Share of views of a white image that come out solarized: white stays >= 0.6 under the jitter and grayscale
    keeps it, so only solarization sends every pixel below the normalised 0."""
    white = torch.full((4000, 8, 8, 3), 255, dtype=torch.uint8)
    return (augment(white, view=view) < 0).flatten(1).all(dim=1).float().mean().item()


@pytest.mark.parametrize("method,recipe,solarized", [("simclr", "simclr", (0.0, 0.0)), ("moco", "moco", (0.2, 0.2)),
                                                     ("byol", "byol", (0.0, 0.2)), ("nnclr", "byol", (0.0, 0.2))])
def test_each_method_trains_on_its_papers_recipe_and_byols_views_are_asymmetric(method, recipe, solarized):
    """BYOL's views differ: solarize p 0 on the first, 0.2 on the second (blur is off at 32 px), jitter (0.4, 0.4, 0.2,
    0.1) as MoCo's; NNCLR trains on BYOL's augmentation."""
    from clsp.train.augment import JITTER
    from clsp.train.loop import _build_method, make_config

    _, built = _build_method(make_config(shards="unused", out="unused", method=method, positives="none"), 16)
    assert built["augment"] == recipe and JITTER[recipe] == {"simclr": (0.4, 0.4, 0.4, 0.1)}.get(recipe,
                                                                                               (0.4, 0.4, 0.2, 0.1))
    torch.manual_seed(0)
    augment = BatchAugment(recipe, size=8)
    for view, p in enumerate(solarized):
        assert solarized_share(augment, view) == pytest.approx(p, abs=0.03)


def test_a_step_augments_the_second_view_and_the_third_as_the_second():
    """The third view (synthetic or a third real one) is paired with view 1 by the CLSP term as view 2 is by the base
    loss, so it takes view 2's augmentation (they differ for BYOL and NNCLR only)."""
    from types import SimpleNamespace

    from clsp.train.epoch import _losses

    for positives, want in (("synthetic", [0, 1, 1]), ("augment", [0, 1, 1]), ("none", [0, 1])):
        seen = []
        run = SimpleNamespace(acc=SimpleNamespace(device=torch.device("cpu")), cfg=SimpleNamespace(positives=positives),
                              augment=lambda images, view=0: seen.append(view) or images.permute(0, 3, 1, 2).float(),
                              model=lambda views, ids, third: None)
        images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
        _losses(run, {"anchor": images, "positive": images, "ids": torch.arange(2)})
        assert seen == want
