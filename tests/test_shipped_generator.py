"""The embedded generator that ships with the project: its weights are the ones its card describes, `make generator`
retrains it with the settings the card records, and the card holds what the issue asks a model card to hold."""
import json
from pathlib import Path

from clsp.synth.diffusion_train import PRESETS, DiffusionTrainConfig
from clsp.synth.models import load_generator

SHIPPED = Path(__file__).resolve().parent.parent / "generators" / "digits-16px"


def _card() -> dict:
    return json.loads((SHIPPED / "card.json").read_text())


def test_the_shipped_weights_are_the_ones_the_card_names_and_stay_small():
    weights = SHIPPED / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20  # at most 20 MB in the repository
    unet, scheduler, info = load_generator(SHIPPED)  # safetensors only: nothing is unpickled
    assert info["weights_sha256"] == _card()["weights_sha256"]
    assert unet.config.sample_size == 16 and scheduler.config.num_train_timesteps == 1000


def test_make_generator_retrains_with_the_settings_the_card_records():
    card = _card()
    from clsp.synth.diffusion_run_dir import GENERATOR_RUN

    retrain = DiffusionTrainConfig(out=Path("unused"), **PRESETS["embedded"]).training_fields()
    weights_only = lambda config: {k: v for k, v in config.items() if k not in GENERATOR_RUN.operational}  # noqa: E731
    assert weights_only(card["config"]) == weights_only(retrain), "PRESETS['embedded'] no longer retrains it"
    assert "clsp diffusion train digits" in card["command"] and "--preset embedded" in card["command"]


def test_the_card_holds_provenance_quality_and_audit_figures():
    card = _card()
    assert card["seed"] == 0 and card["wall_time_s"] > 0 and card["steps"] == PRESETS["embedded"]["steps"]
    assert {"os", "arch", "cpu", "cpu_cores", "torch_threads", "device"} <= set(card["machine"])
    assert {"torch", "diffusers"} <= set(card["package_versions"])
    quality = card["quality"]  # clsp diffusion eval
    assert 0 <= quality["generated"]["confident_pct"] <= 100
    audit = card["audit"]  # clsp eval audit on the shards `make synth` writes with it
    assert 0 <= audit["agreement_pct"]["synthetic"] <= 100 and audit["hardness"]["synthetic"] > 0
