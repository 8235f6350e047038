"""The `clsp` command: stages mounted, version, and the data / shards commands with their exit codes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clsp import __version__
from clsp.cli import STAGES, app

runner = CliRunner()


def test_help_lists_every_stage_and_version_prints():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = re.findall(r"^\s*│?\s*(\w+)\s{2,}\S", result.output.split("Commands")[1], re.M)  # first words
    assert listed == [name for name, _ in STAGES]  # each a command (the description names most of them too)
    assert runner.invoke(app, ["--version"]).output.strip() == f"clsp {__version__}"


def test_the_clsp_script_and_python_m_clsp_run():
    (entry,) = entry_points(group="console_scripts", name="clsp")  # [project.scripts] as installed
    assert entry.value == "clsp.cli:app" and entry.load() is app
    script = Path(sysconfig.get_path("scripts")) / "clsp"  # where pip wrote it for this interpreter
    for command in ([sys.executable, "-m", "clsp"], [str(script)]):
        if command == [str(script)] and not script.exists():
            pytest.skip(f"no clsp script in {script.parent} (installed with pip --target?); python -m clsp passed")
        result = subprocess.run([*command, "shards", "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "verify" in result.stdout, command


def test_data_info_and_sheet_on_the_embedded_source(tmp_path):
    result = runner.invoke(app, ["data", "info", "digits", "--split", "test"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["count"] == 360 and info["classes"] == 10 and len(info["fingerprint"]) == 64
    result = runner.invoke(app, ["data", "sheet", "digits", "--out", str(tmp_path / "d.png"), "--rows", "2"])
    assert result.exit_code == 0 and (tmp_path / "d.png").stat().st_size > 0


def test_a_data_sheet_inside_the_folder_source_it_shows_is_refused(tmp_path):
    from conftest import png_bytes

    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "0.png").write_bytes(png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)))
    out = tmp_path / "images" / "cat" / "sheet.png"  # it would become the class's second image
    result = runner.invoke(app, ["data", "sheet", f"folder:{tmp_path / 'images'}", "--out", str(out)])
    assert result.exit_code == 2 and "choose an --out outside" in result.output and not out.exists()


def test_bad_source_exits_2_with_one_clear_line():
    result = runner.invoke(app, ["data", "info", "nope:/x"])
    assert result.exit_code == 2
    assert "error: unknown source kind 'nope'" in result.output


def test_ctrl_c_in_a_command_is_one_line_and_the_shells_status(monkeypatch):
    """Ctrl-C in synth or eval (no StopFlag of their own) ended the command with status 130 and not a word."""
    import clsp.sources

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(clsp.sources, "open_source", interrupted)
    result = runner.invoke(app, ["data", "info", "digits"])
    assert result.exit_code == 130 and "error: stopped by Ctrl-C; every file is written whole" in result.output
    assert "Traceback" not in result.output


def test_shards_verify_info_and_sheet(shard_dir, tmp_path):
    ok = runner.invoke(app, ["shards", "verify", str(shard_dir)])
    assert ok.exit_code == 0 and "OK (11 anchors x 2 positives in 3 shards)" in ok.output
    info = runner.invoke(app, ["shards", "info", str(shard_dir), "--json"])
    assert json.loads(info.output)["run"]["k"] == 2
    sheet = runner.invoke(app, ["shards", "sheet", str(shard_dir), "--out", str(tmp_path / "s.png")])
    assert sheet.exit_code == 0 and (tmp_path / "s.png").exists()
    url = runner.invoke(app, ["shards", "verify", f"file://{shard_dir}"])  # typed as a path, it lost a slash and
    assert url.exit_code == 2 and "verify checks a local shard directory" in url.output  # "did not exist"
    (shard_dir / "shard-000001.tar").write_bytes(b"garbage")
    bad = runner.invoke(app, ["shards", "verify", str(shard_dir)])
    assert bad.exit_code == 1 and "FAIL shard-000001.tar" in bad.output and "problem(s)" in bad.output


def test_shards_info_and_verify_on_a_folder_that_is_no_shard_directory_exit_2(tmp_path):
    result = runner.invoke(app, ["shards", "info", str(tmp_path)])  # a folder no synth job wrote
    assert result.exit_code == 2 and "is not a shard directory" in result.output
    assert "did not finish" not in result.output
    (tmp_path / "run.json").write_text(json.dumps({"clsp_run": "synth"}))  # a synth job's record, written first
    unfinished = runner.invoke(app, ["shards", "info", str(tmp_path)])
    assert unfinished.exit_code == 2 and "has no manifest.json: the synth job did not finish" in unfinished.output
    assert "or the folder was copied without it (copy its manifest.json and index.parquet too)" in unfinished.output
    for command in ("verify", "info"):  # nothing to verify is a usage error (2), not a directory that fails (1)
        missing = runner.invoke(app, ["shards", command, str(tmp_path / "typo")])
        assert missing.exit_code == 2 and "typo does not exist" in missing.output, (command, missing.output)
        assert "FAIL" not in missing.output and "did not finish" not in missing.output


def test_progress_bars_into_a_log_draw_a_frame_every_30_s():
    """A redirected run's log got a bar frame up to ten times a second (a 48,800-step run: megabytes on one line)."""
    show = "import os, clsp.cli; print(os.environ.get('TQDM_MININTERVAL'), os.environ.get('TQDM_MAXINTERVAL'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    logged = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, env=env)  # stderr: a pipe
    assert logged.stdout.split() == ["30", "60"]
    mine = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                          env={**env, "TQDM_MININTERVAL": "5"})
    assert mine.stdout.split() == ["5", "60"]  # a user's own setting stands
    closed = subprocess.run(["bash", "-c", f'"{sys.executable}" -m clsp --version 2>&-'], capture_output=True,
                            text=True, env=env)  # no stderr at all: the import asked it whether it was a terminal
    assert closed.returncode == 0 and closed.stdout.strip(), closed.stdout
