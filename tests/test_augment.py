"""BatchAugment: shapes, dtype, range, per-sample randomness, seeding, recipes, and agreement with the PIL reference."""
import numpy as np
import pytest
import torch
from PIL import Image

from clsp.train.augment import BatchAugment, EvalTransform, to_unit_float
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
    as_float = images.permute(0, 3, 1, 2).float() / 255
    assert augment(as_float).shape == (16, 3, 8, 8)
    assert not out.requires_grad


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


@pytest.mark.parametrize("recipe", ["simclr", "moco"])
def test_batch_and_pil_pipelines_agree_in_distribution(recipe):
    # the same image augmented 256 times by each pipeline: per-channel mean and spread must be close
    g = np.random.default_rng(0)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[4:12, 6:10] = (230, 180, 40)  # a coloured bar on black, like a digit stroke
    image += g.integers(0, 20, image.shape, dtype=np.uint8)
    torch.manual_seed(0)
    batch = BatchAugment(recipe, size=16)(torch.from_numpy(image)[None].expand(256, -1, -1, -1))
    reference = pil_reference(recipe, 16)
    pil = torch.stack([reference(Image.fromarray(image)) for _ in range(256)])  # (256, 3, 16, 16)
    assert pil.shape == batch.shape
    assert torch.allclose(batch.mean(dim=(0, 2, 3)), pil.mean(dim=(0, 2, 3)), atol=0.08)
    assert torch.allclose(batch.std(dim=(0, 2, 3)), pil.std(dim=(0, 2, 3)), rtol=0.15)
