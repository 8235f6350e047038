"""Generator save/load (both layouts), weight fingerprints, and the encoder/decoder split of UNet2DModel."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, ScoreSdeVeScheduler

from clsp.errors import UserError
from clsp.hashing import weights_sha256
from clsp.synth.models import load_generator, save_generator
from clsp.synth.unet_split import decode, embed_time, encode
from clsp.synth.untrained_unets import ddpm_cifar10_unet, tiny_unet


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(sample_size=16, block_out_channels=(8, 16))


def test_save_then_load_gives_the_same_generator(tmp_path, unet):
    scheduler = DDIMScheduler(num_train_timesteps=200, beta_end=0.03)
    card = {"model_id": "digits-test", "source": {"spec": "digits", "fingerprint": "abc"}, "epochs": 1}
    saved = save_generator(tmp_path / "gen", unet, scheduler, card)
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == [
        "README.md", "card.json", "model_index.json", "scheduler", "unet"]
    assert list((tmp_path / "gen" / "unet").glob("*.safetensors"))

    loaded, sched, info = load_generator(tmp_path / "gen")
    assert info == saved
    assert info["model_id"] == "digits-test" and info["weights_sha256"] == weights_sha256(unet)
    assert (info["sample_size"], info["in_channels"], info["num_train_timesteps"]) == (16, 3, 200)
    assert isinstance(sched, DDIMScheduler)
    torch.testing.assert_close(sched.betas, scheduler.betas)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 150])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, unet(x, t).sample)
    card_back = json.loads((tmp_path / "gen" / "card.json").read_text())
    assert card_back["source"] == card["source"] and card_back["weights_sha256"] == info["weights_sha256"]
    assert info["weights_sha256"] in (tmp_path / "gen" / "README.md").read_text()


def test_hub_layout_dir_loads_with_a_ddim_scheduler_and_the_same_fingerprint(tmp_path, unet):
    unet.save_pretrained(tmp_path / "hub", safe_serialization=True)  # config.json + safetensors at the root
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large").save_pretrained(
        tmp_path / "hub")  # scheduler_config.json at the root, as in google/ddpm-cifar10-32
    loaded, sched, info = load_generator(str(tmp_path / "hub"))
    assert isinstance(sched, DDIMScheduler) and sched.config.num_train_timesteps == 1000
    torch.testing.assert_close(sched.alphas_cumprod, DDPMScheduler().alphas_cumprod)
    assert info["weights_sha256"] == weights_sha256(unet)


@pytest.mark.parametrize("scheduler, message", [
    # sigmas, no betas: DDIM's default linear betas took their place without a word
    (lambda: ScoreSdeVeScheduler(), r"its ScoreSdeVeScheduler config gives sigmas \(sigma_max, sigma_min\) and no "
                                    r"betas: a variance-exploding or EDM model"),
    (lambda: DDPMScheduler(beta_schedule="sigmoid"), r"DDIM cannot take its DDPMScheduler config \(sigmoid"),  # was
])  # a traceback
def test_a_scheduler_ddim_cannot_follow_is_refused_by_name(tmp_path, unet, scheduler, message):
    unet.save_pretrained(tmp_path / "hub", safe_serialization=True)
    scheduler().save_pretrained(tmp_path / "hub")
    with pytest.raises(UserError, match=message):
        load_generator(str(tmp_path / "hub"))


def test_a_ddpm_config_that_names_no_betas_has_the_default_ones(tmp_path, unet):
    """A hub config of only {_class_name, num_train_timesteps} relies on diffusers' default (linear) betas."""
    unet.save_pretrained(tmp_path / "hub", safe_serialization=True)
    (tmp_path / "hub" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
                                                                         "num_train_timesteps": 1000}))
    _, scheduler, _ = load_generator(str(tmp_path / "hub"))
    torch.testing.assert_close(scheduler.alphas_cumprod, DDPMScheduler().alphas_cumprod)


def test_fingerprint_changes_with_the_weights(unet):
    other = tiny_unet(sample_size=16, block_out_channels=(8, 16))
    assert weights_sha256(other) == weights_sha256(unet)  # same seed, same weights
    with torch.no_grad():
        other.conv_out.bias[0] += 1e-3
    assert weights_sha256(other) != weights_sha256(unet)


def test_unusable_paths_raise_user_errors_with_a_fix(tmp_path, unet):
    missing = tmp_path / "runs" / "digits" / "generator"
    with pytest.raises(UserError, match="not found.*clsp diffusion train"):
        load_generator(missing)
    save_generator(tmp_path / "gen", unet, DDIMScheduler(), {})
    (tmp_path / "gen" / "model_index.json").unlink()  # as if the save had been interrupted
    with pytest.raises(UserError, match="incomplete"):
        load_generator(tmp_path / "gen")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a generator dir"):
        load_generator(tmp_path / "empty")
    (tmp_path / "gen" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match=r"gen/unet' is the unet/ of a pipeline folder: pass that folder \(.*gen\)"):
        load_generator(tmp_path / "gen" / "unet")  # "has no scheduler_config.json in unet/", it said


def test_an_unfinished_training_run_is_named_with_how_to_finish_it(tmp_path):
    """`clsp diffusion train --out DIR` stopped before its last step: DIR holds its record and checkpoints, no unet/.
    Passing DIR as a generator says so and gives the resume command, not "not a generator dir"."""
    from clsp.run_dir import prepare_run_dir
    from clsp.synth.diffusion_run_dir import GENERATOR_RUN

    with prepare_run_dir(tmp_path / "gen", {"source": "digits", "steps": 100}, GENERATOR_RUN, False, False):
        (tmp_path / "gen" / "checkpoints").mkdir()
    with pytest.raises(UserError, match=r"has not finished .*`clsp diffusion train digits --out .*gen --resume`"):
        load_generator(str(tmp_path / "gen"))


def test_pickle_weights_are_never_loaded(tmp_path, unet):
    unet.save_config(tmp_path / "bin")
    (tmp_path / "bin" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle, must never be unpickled")
    DDIMScheduler().save_pretrained(tmp_path / "bin")
    with pytest.raises(UserError, match="no file named diffusion_pytorch_model.safetensors"):
        load_generator(tmp_path / "bin")


@pytest.mark.parametrize("config", [
    dict(),  # DownBlock2D + AttnDownBlock2D, positional time embedding
    dict(block_out_channels=(8, 8, 16), center_input_sample=True, resnet_time_scale_shift="scale_shift"),
    dict(mid_block_type=None, num_class_embeds=3),
    dict(block_out_channels=(32, 32), down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
         up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), time_embedding_type="fourier"),
], ids=["attn", "3-level-scale-shift", "no-mid-class-cond", "skip-blocks-fourier"])
def test_decode_of_encode_equals_the_whole_unet(config):
    unet = tiny_unet(sample_size=16, **config)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 400, 999])
    labels = torch.tensor([0, 2, 1]) if "num_class_embeds" in config else None
    with torch.no_grad():
        h, skips = encode(unet, x, t, class_labels=labels)
        out = decode(unet, h, skips, embed_time(unet, t, 3, labels), t)
        expected = unet(x, t, class_labels=labels).sample
    assert h.shape[0] == 3 and h.shape[-1] == 16 // 2 ** (len(unet.config.block_out_channels) - 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_split_refuses_other_models():
    with pytest.raises(TypeError, match="UNet2DModel"):
        encode(torch.nn.Conv2d(3, 3, 1), torch.zeros(1, 3, 8, 8), 0)


def test_ddpm_cifar10_architecture():
    unet = ddpm_cifar10_unet()
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307  # the 35.7M-parameter DDPM CIFAR-10 UNet
    h, skips = encode(unet, torch.zeros(1, 3, 32, 32), 10)
    assert h.shape == (1, 256, 4, 4) and len(skips) == 12
    # attention only at 16x16: the second down level and the third up level
    assert [hasattr(b, "attentions") for b in unet.down_blocks] == [False, True, False, False]
    assert [hasattr(b, "attentions") for b in unet.up_blocks] == [False, False, True, False]
