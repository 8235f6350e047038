"""What the Makefile's targets run (`make -n`, nothing executed): the embedded preset on the digits, the paper's
settings on a user's data (README, "The two commands")."""
import shutil
import subprocess
from pathlib import Path

import pytest

from clsp.eval.linear import PROBE_PRESETS
from clsp.train.loop import PRESETS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make, which `make test` itself uses")


def commands(*targets: str, **variables: str) -> dict[str, str]:
    """{"train run": the clsp command line, "eval all": ...} that `make -n TARGETS VAR=VALUE...` would run."""
    out = subprocess.run(["make", "-n", *targets, *(f"{k}={v}" for k, v in variables.items())], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")  # joined
    return {" ".join(line.split()[1:3]): line for line in out.splitlines() if line.startswith(".venv/bin/clsp ")}


def test_a_users_data_trains_and_scores_with_the_papers_settings():
    run = commands("train", "eval", SOURCE="cifar10:/data/cifar", MODEL="google/ddpm-cifar10-32")
    assert "--preset paper-cifar10" in run["train run"] and "--preset paper" in run["eval all"]
    assert PRESETS["paper-cifar10"]["epochs"] == 1000 and PRESETS["paper-cifar10"]["batch_size"] == 1024
    assert PROBE_PRESETS["paper"].epochs == 100
    moco = commands("train", SOURCE="cifar10:/data/cifar", METHOD="moco")["train run"]
    assert "--method moco" in moco and "--preset" not in moco  # paper-cifar10 is SimCLR's: MoCo takes its defaults
    study = commands("study", SOURCE="cifar10:/data/cifar", MODEL="google/ddpm-cifar10-32")["eval study"]
    assert "--preset paper" in study  # the study's paper settings (its default is the embedded preset)


def test_the_embedded_default_keeps_its_preset():
    run = commands("synth", "train", "eval")
    assert "--preset embedded" in run["synth run"] and "--preset embedded" in run["train run"]
    assert "--preset" not in run["eval all"]  # eval's own default is the embedded probe
    assert "--preset" not in commands("study")["eval study"]  # the study's own default is the embedded preset
