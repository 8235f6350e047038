"""One meaning per option name across the stages: --precision, --device, --batch-size, --forward-batch."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from clsp.cli import app
from clsp.errors import UserError
from clsp.vocabulary import bf16_for

runner = CliRunner()


def test_precision_means_the_same_in_every_stage():
    assert bf16_for(None, cuda=True) is None  # not given: the stage's default (auto)
    assert bf16_for("auto", cuda=True) and bf16_for("auto", cuda=False)  # auto: bf16 where a GPU runs it
    assert bf16_for("bf16", cuda=True) and bf16_for("fp32", cuda=True) is False
    with pytest.raises(UserError, match="bf16 is for GPUs and this run is on the CPU"):
        bf16_for("bf16", cuda=False)
    with pytest.raises(UserError, match="not one of auto, bf16, fp32"):
        bf16_for("fp16", cuda=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 on a GPU is accepted; the refusal is the CPU's")
@pytest.mark.parametrize("command", [["train", "run", "shards", "--out", "x"],
                                     ["synth", "run", "digits", "--model", "m", "--out", "x", "--device", "cpu"],
                                     ["diffusion", "train", "digits", "--out", "x"]])
def test_bf16_on_a_run_without_a_gpu_is_refused_in_every_stage(tmp_path, command):
    result = runner.invoke(app, [*(str(tmp_path / c) if c == "x" else c for c in command), "--precision", "bf16"])
    assert result.exit_code == 2 and "--precision bf16 is for GPUs" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_every_sampler_field_is_a_synth_option_with_its_help_and_default():
    from dataclasses import fields

    from clsp.synth.cli import SAMPLER_FIELDS
    from clsp.synth.sampler import SAMPLER_HELP, SamplerConfig

    names = [f.name for f in fields(SamplerConfig)]
    assert [name for name, _, _ in SAMPLER_FIELDS] == names and set(SAMPLER_HELP) == set(names)
    assert {name: default for name, _, default in SAMPLER_FIELDS} == {f.name: f.default for f in fields(SamplerConfig)}
    text = " ".join(runner.invoke(app, ["synth", "run", "--help"]).output.split())
    for name in names:
        assert f"--{name.replace('_', '-')}" in text and SAMPLER_HELP[name].split(" (")[0] in text
