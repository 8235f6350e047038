"""The CLSP sampler on tiny UNets (2-3 DDIM steps): plain-DDIM limit, reproducibility, batch independence."""

import pytest
import torch
from diffusers import DDIMScheduler

from synth.models import tiny_unet
from synth.sampler import (
    SamplerConfig,
    candidate_seed,
    ddim_scheduler,
    naive_reference,
    row_generators,
    sample_positives,
    start_noise,
)

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(sample_size=16, block_out_channels=(8, 16))


@pytest.fixture(scope="module")
def scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)


def seeds_for(anchor_id: str, k: int, seed: int = 0) -> list[int]:
    return [candidate_seed(seed, anchor_id, j) for j in range(k)]


def anchors_like(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (n, 3, 16, 16)


def run(unet, scheduler, seeds, anchors, config, **kwargs):
    gens = row_generators(seeds)
    x_T = start_noise(gens, SHAPE)  # first draw of each row generator
    return sample_positives(unet, scheduler, x_T, anchors, gens, config, **kwargs)


def test_w1_is_plain_ddim_from_the_same_noise(unet, scheduler):
    config = SamplerConfig(w=1.0, steps=3, eta=0.5)
    seeds = seeds_for("a0", 3)
    anchors = anchors_like(3)
    anchor_gens = row_generators([candidate_seed(0, "a0", f"anchor{j}") for j in range(3)])
    out = run(unet, scheduler, seeds, anchors, config, anchor_generators=anchor_gens)

    # Reference: an ordinary DDIM loop on the whole UNet, variance noise from the same row generators.
    gens = row_generators(seeds)
    x = start_noise(gens, SHAPE)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(3)
    with torch.no_grad():
        for t in ddim.timesteps:
            eps = unet(x, t).sample
            noise = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
            x = ddim.step(eps, t, x, eta=0.5, variance_noise=noise).prev_sample
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_same_seeds_same_output_and_candidates_differ(unet, scheduler):
    config = SamplerConfig(w=0.1, steps=3, eta=0.1)
    anchors = anchors_like(1).repeat(4, 1, 1, 1)  # one anchor, K = 4 candidates
    first = run(unet, scheduler, seeds_for("a1", 4), anchors, config)
    again = run(unet, scheduler, seeds_for("a1", 4), anchors, config)
    assert torch.equal(first, again)
    assert first.min() >= -1 and first.max() <= 1
    flat = first.flatten(1)
    distances = torch.cdist(flat, flat)[~torch.eye(4, dtype=torch.bool)]
    assert distances.min() > 1e-2  # every pair of candidates differs
    assert (flat - anchors.flatten(1)).norm(dim=1).min() > 1e-2  # and none copies the anchor
    other_seed = run(unet, scheduler, seeds_for("a1", 4, seed=1), anchors, config)
    assert not torch.allclose(first, other_seed)


def test_row_output_does_not_depend_on_batch(unet, scheduler):
    config = SamplerConfig(w=0.2, steps=2, eta=0.3)
    anchors = anchors_like(5, seed=3)
    seeds = [candidate_seed(0, f"img{i}", 0) for i in range(5)]
    batch = run(unet, scheduler, seeds, anchors, config)
    alone = run(unet, scheduler, seeds[2:3], anchors[2:3], config)
    reordered = run(unet, scheduler, seeds[::-1], anchors.flip(0), config).flip(0)
    torch.testing.assert_close(alone[0], batch[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reordered, batch, atol=1e-5, rtol=1e-5)


def test_naive_reference_matches_split_sampler(unet, scheduler):
    config = SamplerConfig(w=0.3, steps=2, eta=0.5)
    anchors = anchors_like(3, seed=4)
    seeds = seeds_for("a2", 3)
    fast = run(unet, scheduler, seeds, anchors, config)
    gens = row_generators(seeds)
    naive = naive_reference(unet, scheduler, start_noise(gens, SHAPE), anchors, gens, config)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    # the mixing matters: w = 1 (no anchor) gives a different result from the same noise
    assert not torch.allclose(fast, run(unet, scheduler, seeds, anchors, SamplerConfig(w=1.0, steps=2, eta=0.5)))


def test_shared_anchor_noise_is_one_draw_per_group(unet, scheduler):
    """One shared generator per anchor == per-row generators that all produce that same stream."""
    anchors = torch.cat([anchors_like(1, seed=5).repeat(3, 1, 1, 1), anchors_like(1, seed=6).repeat(3, 1, 1, 1)])
    seeds = seeds_for("a3", 3) + seeds_for("a4", 3)
    group_seeds = [candidate_seed(0, "a3", "anchor")] * 3 + [candidate_seed(0, "a4", "anchor")] * 3
    shared = [torch.Generator().manual_seed(group_seeds[0])] * 3 + [torch.Generator().manual_seed(group_seeds[3])] * 3
    out_shared = run(unet, scheduler, seeds, anchors, SamplerConfig(steps=2, share_anchor_noise=True),
                     anchor_generators=shared)
    out_copies = run(unet, scheduler, seeds, anchors, SamplerConfig(steps=2),
                     anchor_generators=row_generators(group_seeds))
    torch.testing.assert_close(out_shared, out_copies, atol=1e-6, rtol=1e-6)
    out_own = run(unet, scheduler, seeds, anchors, SamplerConfig(steps=2))
    assert not torch.allclose(out_shared, out_own)


def test_shared_anchor_noise_misuse_is_refused(unet, scheduler):
    anchors = anchors_like(2)
    seeds = seeds_for("a5", 2)
    shared = [torch.Generator().manual_seed(0)] * 2
    with pytest.raises(ValueError, match="needs anchor_generators"):
        run(unet, scheduler, seeds, anchors, SamplerConfig(steps=1, share_anchor_noise=True))
    with pytest.raises(ValueError, match="share_anchor_noise is off"):
        run(unet, scheduler, seeds, anchors[:1].repeat(2, 1, 1, 1), SamplerConfig(steps=1), anchor_generators=shared)
    with pytest.raises(ValueError, match="different anchors"):
        run(unet, scheduler, seeds, anchors, SamplerConfig(steps=1, share_anchor_noise=True), anchor_generators=shared)


@pytest.mark.parametrize("kwargs, message", [
    (dict(w=1.5), r"w must be a number in \[0, 1\]"),
    (dict(w=-0.1), r"w must be a number in \[0, 1\]"),
    (dict(eta=2.0), r"eta must be a number in \[0, 1\]"),
    (dict(steps=0), r"steps must be an integer >= 1"),
    (dict(steps=2.5), r"steps must be an integer >= 1"),
    (dict(share_anchor_noise="yes"), r"share_anchor_noise must be True or False"),
])
def test_bad_config_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_inputs_checked_against_the_generator(unet, scheduler):
    gens = row_generators([1, 2])
    x_T = start_noise(gens, SHAPE)
    with pytest.raises(ValueError, match="exceeds the generator's num_train_timesteps = 1000"):
        sample_positives(unet, scheduler, x_T, anchors_like(2), gens, SamplerConfig(steps=1001))
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):
        sample_positives(unet, scheduler, x_T, anchors_like(2) * 127 + 128, gens, SamplerConfig(steps=1))
    with pytest.raises(ValueError, match="one generator per row"):
        sample_positives(unet, scheduler, x_T, anchors_like(2), gens[:1], SamplerConfig(steps=1))


def test_candidate_seed_is_keyed_on_ids():
    s = candidate_seed(0, "img7", 3)
    assert s == candidate_seed(0, "img7", 3) and 0 <= s < 2**63
    others = {candidate_seed(0, "img7", 4), candidate_seed(1, "img7", 3), candidate_seed(0, "img8", 3),
              candidate_seed(0, "img7", "anchor")}
    assert s not in others and len(others) == 4


def test_scheduler_copy_avoids_linspace_and_leaves_callers_scheduler_alone(scheduler):
    linspace = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    private = ddim_scheduler(linspace, 4)
    assert private.timesteps.tolist() == [750, 500, 250, 0]  # "leading": steps of T // steps, ending at 0
    assert linspace.num_inference_steps is None and private is not linspace
