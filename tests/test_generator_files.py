"""A generator dir whose JSON files are damaged or foreign: a UserError naming the file and the fix, never a
JSONDecodeError traceback from inside the loader."""
from __future__ import annotations

import re

import pytest
from diffusers import DDIMScheduler

from clsp.errors import UserError
from clsp.synth.models import load_generator, save_generator
from clsp.synth.untrained_unets import tiny_unet


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen") / "gen"
    save_generator(directory, tiny_unet(sample_size=16, block_out_channels=(8, 16)), DDIMScheduler(), {"model_id": "g"})
    return directory


@pytest.mark.parametrize("name", ["card.json", "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("content, reason", [(b'{"model_id": "g",', "not valid JSON"),
                                             (b"\xff\xfe not text", "not valid JSON"),
                                             (b'["a list"]', "valid JSON but not an object")])
def test_a_damaged_json_file_is_a_user_error_naming_it_and_the_fix(saved, name, content, reason):
    file = saved / name
    original = file.read_bytes()
    file.write_bytes(content)
    try:
        fix = "Fix: .*re-run the command that wrote the dir"
        with pytest.raises(UserError, match=rf"{re.escape(str(file))} is {reason}.*{fix}"):
            load_generator(saved)
    finally:
        file.write_bytes(original)
    assert load_generator(saved)[2]["model_id"] == "g"  # restored: the same dir loads again
