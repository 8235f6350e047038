"""The CLSP sampler on tiny UNets (2-3 DDIM steps): plain-DDIM limit, reproducibility, batch independence, and the
two generators of noise (synth/noise.py)."""

import pytest
import torch
from diffusers import DDIMScheduler

from clsp.synth.noise import (
    ANCHOR,
    START,
    VARIANCE,
    CounterNoise,
    GeneratorNoise,
    candidate_seed,
    counter_normal,
    philox4x32,
    row_noise,
)
from clsp.synth.sampler import SamplerConfig, ddim_scheduler, naive_reference, sample_positives
from clsp.synth.untrained_unets import tiny_unet

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


def own_noise(keys: list[int], kind: str = "counter"):
    """Each row its own noise, keyed on its seed."""
    if kind == "counter":
        return CounterNoise(keys, keys)
    return GeneratorNoise([torch.Generator().manual_seed(k) for k in keys])


def run(unet, scheduler, seeds, anchors, config, fn=sample_positives):
    return fn(unet, scheduler, anchors, own_noise(seeds, config.noise), config)


@pytest.mark.parametrize("noise", ["counter", "cpu-generator"])
def test_w1_is_plain_ddim_from_the_same_noise(unet, scheduler, noise):
    """An independent reference: an ordinary DDIM loop on the whole UNet, fed the same noise drawn by hand."""
    config = SamplerConfig(w=1.0, steps=3, eta=0.5, noise=noise)
    seeds = seeds_for("a0", 3)
    anchors = anchors_like(3)
    out = run(unet, scheduler, seeds, anchors, config)

    keys = torch.tensor(seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    by_hand = {  # (what, step) -> (B, C, H, W)
        "counter": lambda what, i: counter_normal(keys, what, i, SHAPE),
        # cpu-generator: per row, x_T first, then per step the anchor draw (unused at w = 1), then the variance draw
        "cpu-generator": lambda what, i: torch.stack([torch.randn(SHAPE, generator=g) for g in gens]),
    }[noise]
    x = by_hand(START, 0)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(3)
    with torch.no_grad():
        for i, t in enumerate(ddim.timesteps):
            by_hand(ANCHOR, i)
            eps = unet(x, t).sample
            x = ddim.step(eps, t, x, eta=0.5, variance_noise=by_hand(VARIANCE, i)).prev_sample
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


@pytest.mark.parametrize("noise", ["counter", "cpu-generator"])
def test_row_output_does_not_depend_on_batch(unet, scheduler, noise):
    config = SamplerConfig(w=0.2, steps=2, eta=0.3, noise=noise)
    anchors = anchors_like(5, seed=3)
    seeds = [candidate_seed(0, f"img{i}", 0) for i in range(5)]
    batch = run(unet, scheduler, seeds, anchors, config)
    alone = run(unet, scheduler, seeds[2:3], anchors[2:3], config)
    reordered = run(unet, scheduler, seeds[::-1], anchors.flip(0), config).flip(0)
    torch.testing.assert_close(alone[0], batch[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reordered, batch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("noise", ["counter", "cpu-generator"])
def test_naive_reference_matches_split_sampler(unet, scheduler, noise):
    config = SamplerConfig(w=0.3, steps=2, eta=0.5, noise=noise)
    anchors = anchors_like(3, seed=4)
    seeds = seeds_for("a2", 3)
    fast = run(unet, scheduler, seeds, anchors, config)
    naive = run(unet, scheduler, seeds, anchors, config, fn=naive_reference)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    # the mixing matters: w = 1 (no anchor) gives a different result from the same noise
    plain = SamplerConfig(w=1.0, steps=2, eta=0.5, noise=noise)
    assert not torch.allclose(fast, run(unet, scheduler, seeds, anchors, plain))


@pytest.mark.parametrize("noise", ["counter", "cpu-generator"])
def test_shared_anchor_noise_is_one_draw_per_anchor(unet, scheduler, noise):
    """Sharing: the K rows of an anchor see one anchor-noise draw per step, keyed on (seed, id, "anchor"); it equals
    giving every row that same key by hand, and differs from each row drawing its own."""
    anchors = torch.cat([anchors_like(1, seed=5).repeat(3, 1, 1, 1), anchors_like(1, seed=6).repeat(3, 1, 1, 1)])
    shared = SamplerConfig(steps=2, share_anchor_noise=True, noise=noise)
    out_shared = sample_positives(unet, scheduler, anchors, row_noise(noise, 0, ["a3", "a4"], 3, True), shared)
    keys = seeds_for("a3", 3) + seeds_for("a4", 3)
    if noise == "counter":
        assert row_noise(noise, 0, ["a3", "a4"], 3, True).group_keys.numel() == 2  # one draw per anchor
        group_keys = [candidate_seed(0, "a3", "anchor")] * 3 + [candidate_seed(0, "a4", "anchor")] * 3
        by_hand = CounterNoise(keys, group_keys)
    else:
        per_anchor = [torch.Generator().manual_seed(candidate_seed(0, a, "anchor")) for a in ("a3", "a4")]
        by_hand = GeneratorNoise([torch.Generator().manual_seed(k) for k in keys],
                                 [g for g in per_anchor for _ in range(3)])
    torch.testing.assert_close(out_shared, sample_positives(unet, scheduler, anchors, by_hand, shared), atol=0, rtol=0)
    out_own = sample_positives(unet, scheduler, anchors, row_noise(noise, 0, ["a3", "a4"], 3, False),
                               SamplerConfig(steps=2, noise=noise))
    assert not torch.allclose(out_shared, out_own)


def test_anchor_noise_groups_are_numbered_in_row_order_so_one_layout_has_one_anchor_row():
    """Batches of one layout (A anchors x K) map rows to the same anchor-noise groups whatever their anchor ids: a
    CUDA graph captured for the first batch holds that map fixed (synth/cuda_graph.py)."""
    for share, expected in ((True, [a for a in range(4) for _ in range(2)]), (False, list(range(8)))):
        for batch in range(6):
            noise = row_noise("counter", 0, [f"img{batch}-{a}" for a in range(4)], 2, share)
            assert noise.anchor_row.tolist() == expected, (share, batch)
            assert noise.group_keys[noise.anchor_row].tolist() == (  # each row still draws its own key's noise
                [candidate_seed(0, f"img{batch}-{a}", "anchor") for a in range(4) for _ in range(2)] if share
                else noise.keys.tolist())


def test_shared_anchor_noise_misuse_is_refused(unet, scheduler):
    anchors = anchors_like(2)
    same_key = CounterNoise(seeds_for("a5", 2), [7, 7])  # two rows, one anchor-noise key
    with pytest.raises(ValueError, match="share_anchor_noise is off"):
        sample_positives(unet, scheduler, anchors[:1].repeat(2, 1, 1, 1), same_key, SamplerConfig(steps=1))
    with pytest.raises(ValueError, match="different anchors"):
        sample_positives(unet, scheduler, anchors, same_key, SamplerConfig(steps=1, share_anchor_noise=True))
    with pytest.raises(ValueError, match="not the config's generator of noise 'cpu-generator'"):
        sample_positives(unet, scheduler, anchors, own_noise([1, 2]), SamplerConfig(steps=1, noise="cpu-generator"))


def test_philox_matches_its_published_known_answers():
    """Philox4x32-10 known-answer vectors of Random123 (Salmon et al. 2011): counter, key -> four words."""
    vectors = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for counter, key, expected in vectors:
        words = philox4x32([torch.tensor([c]) for c in counter], [torch.tensor([k]) for k in key])
        assert [int(w) for w in words] == expected


def test_counter_noise_is_keyed_and_standard_normal():
    keys = torch.tensor([candidate_seed(0, f"img{i}", j) for i in range(64) for j in range(4)])  # 256 rows
    values = counter_normal(keys, VARIANCE, 5, SHAPE)  # (256, 3, 16, 16)
    assert values.shape == (256, *SHAPE) and values.dtype == torch.float32
    # a row is a function of (key, draw, step) alone: the same alone, in another batch, in another order
    torch.testing.assert_close(counter_normal(keys[7:8], VARIANCE, 5, SHAPE)[0], values[7], atol=0, rtol=0)
    torch.testing.assert_close(counter_normal(keys.flip(0), VARIANCE, 5, SHAPE).flip(0), values, atol=0, rtol=0)
    for other in (counter_normal(keys, VARIANCE, 6, SHAPE), counter_normal(keys, ANCHOR, 5, SHAPE)):
        assert (other - values).abs().mean() > 0.5  # another step or draw: another, independent draw
    flat = values.flatten()  # 196,608 values
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 1) < 0.01
    assert abs(float((flat > 1.96).float().mean()) - 0.025) < 0.002  # the tail of a standard normal
    rows = values.flatten(1)
    correlation = torch.corrcoef(rows[:32])[~torch.eye(32, dtype=torch.bool)].abs()  # 496 pairs of 768 values
    # independent rows: |r| has mean sqrt(2 / pi) / sqrt(768) = 0.029 and hardly ever passes 6 / sqrt(768) = 0.22
    assert float(correlation.mean()) < 0.035 and float(correlation.max()) < 0.22


@pytest.mark.parametrize("kwargs, message", [
    (dict(w=1.5), r"w must be a number in \[0, 1\]"),
    (dict(w=-0.1), r"w must be a number in \[0, 1\]"),
    (dict(eta=2.0), r"eta must be a number in \[0, 1\]"),
    (dict(steps=0), r"steps must be an integer >= 1"),
    (dict(steps=2.5), r"steps must be an integer >= 1"),
    (dict(share_anchor_noise="yes"), r"share_anchor_noise must be True or False"),
    (dict(noise="numpy"), r"noise must be one of counter, cpu-generator"),
])
def test_bad_config_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_inputs_checked_against_the_generator(unet, scheduler):
    noise = own_noise([1, 2])
    with pytest.raises(ValueError, match="exceeds the generator's num_train_timesteps = 1000"):
        sample_positives(unet, scheduler, anchors_like(2), noise, SamplerConfig(steps=1001))
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):
        sample_positives(unet, scheduler, anchors_like(2) * 127 + 128, noise, SamplerConfig(steps=1))
    with pytest.raises(ValueError, match="noise for 1 rows, 2 anchor rows"):
        sample_positives(unet, scheduler, anchors_like(2), own_noise([1]), SamplerConfig(steps=1))


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


def test_a_bf16_unet_samples_in_bf16_and_lands_near_the_fp32_positives(unet, scheduler):
    """The GPU's bf16-weights form (synth.bench's "bf16-weights" column): every UNet input is cast to the weights'
    dtype, the DDIM update stays fp32, and the positives stay within bf16 rounding of the fp32 ones."""
    import copy

    config = SamplerConfig(steps=3)
    seeds, anchors = seeds_for("a0", 4), anchors_like(4)
    fp32 = run(unet, scheduler, seeds, anchors, config)
    seen = []
    bf16_unet = copy.deepcopy(unet).to(torch.bfloat16)
    hook = bf16_unet.conv_in.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    out = run(bf16_unet, scheduler, seeds, anchors, config)
    hook.remove()
    assert out.dtype == torch.float32 and seen == [torch.bfloat16] * 3
    assert 0 < float((out - fp32).abs().mean()) < 0.02
    assert float((out - fp32).abs().max()) < 0.25


def test_compiled_counter_noise_is_one_graph_with_a_few_compiles_and_the_same_draws():
    """What `--compile` does to the noise on a GPU (inductor there); aot_eager traces it the same way on the CPU
    (dynamo, fullgraph) and runs the traced graph with eager kernels, so the draws must be equal to the bit."""
    from torch._dynamo.utils import counters

    keys = seeds_for("a0", 4) + seeds_for("a1", 4)
    anchor_keys = [keys[0]] * 4 + [keys[4]] * 4  # shared anchor noise: 2 groups, so the row count changes too
    eager = CounterNoise(keys, anchor_keys)
    traced = CounterNoise(keys, anchor_keys, compile_backend="aot_eager")
    before = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(traced.start(SHAPE, "cpu"), eager.start(SHAPE, "cpu"), rtol=0, atol=0)
    for step in range(6):
        for draw in ("anchor", "variance"):
            got, want = getattr(traced, draw)(step, SHAPE, "cpu"), getattr(eager, draw)(step, SHAPE, "cpu")
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert 1 <= counters["stats"]["unique_graphs"] - before <= 4  # not one per step: step and rows become symbolic
