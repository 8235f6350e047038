"""The training loop end to end on tiny shards: files written, refusal to clobber, resume after SIGKILL/SIGTERM with
identical weights, NaN stop, corrupt shards, two processes under torchrun, and the CLI."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from safetensors.torch import load_file
from typer.testing import CliRunner

from clsp.accelerator import stop_only_when_the_parent_says
from clsp.errors import UserError
from conftest import as_a_terminals_job, build_shard_dir, dead_pid, lock_held
from clsp.file_io import read_json
from clsp.train.backbones import build_backbone
from clsp.train.checkpoint import load_backbone
from clsp.train.loop import make_config, train

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_train_worker.py"
COUNTS = (10, 7, 9)  # 26 anchors in uneven shards: 6 steps of 4 per epoch on one process, 6 of 2 + 2 on two
TINY = dict(width=4, epochs=3, batch_size=4, lr=0.05, warmup_epochs=1.0, proj_hidden=16, proj_dim=8, workers=0,
            seed=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_shard_dir(tmp_path_factory.mktemp("loop") / "shards", counts=COUNTS, k=2)


def options(shards: Path, out: Path, **extra) -> dict:
    return {**TINY, "shards": str(shards), "out": str(out), **extra}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name  # bit for bit


def log_steps(run: Path) -> list[int]:
    with open(run / "log.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def on_optimizer_step(n: int, action):
    """A torch-global hook calling `action()` right after the n-th optimizer step (fault injection)."""
    done = [0]

    def hook(optimizer, args, kwargs) -> None:
        done[0] += 1
        if done[0] == n:
            action(optimizer)

    return register_optimizer_step_post_hook(hook)


@contextmanager
def sigterm_after_step(n: int):
    """Within the block, SIGTERM to this process right after the n-th optimizer step (seen at the next step's check)."""
    handle = on_optimizer_step(n, lambda _: os.kill(os.getpid(), signal.SIGTERM))
    try:
        yield
    finally:
        handle.remove()


def test_a_tiny_run_writes_its_files_and_never_clobbers_a_finished_run(shards, tmp_path):
    out = tmp_path / "run"
    assert train(make_config(**options(shards, out, knn_every=1, knn_source="digits"))) == out
    for name in ("checkpoint/model.safetensors", "checkpoint/optimizer.pt", "checkpoint/rng-rank0.pt", "log.csv",
                 "backbone.safetensors", "config.json", "summary.json"):
        assert (out / name).exists(), name
    assert log_steps(out) == list(range(1, 19))
    summary = read_json(out / "summary.json")  # --precision auto: bf16 autocast on a GPU only, fp32 on the CPU
    assert (summary["device"], summary["mixed_precision"]) == (("cuda", "bf16") if torch.cuda.is_available()
                                                                else ("cpu", "no"))
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    knn = [float(r["knn_top1_pct"]) for r in rows if r["knn_top1_pct"]]
    assert len(knn) == 3 and all(0.0 <= v <= 100.0 for v in knn) and max(knn) > 1.0  # one per epoch, in percent
    assert read_json(out / "checkpoint" / "position.json") == {"epoch": 3, "step": 0, "global_step": 18}
    backbone, config = load_backbone(out)
    assert not backbone.training and config["image_size"] == 8 and config["data"]["source"]["count"] == 26
    features = backbone(torch.zeros(2, 3, 8, 8))
    assert features.shape == (2, config["backbone"]["feat_dim"])
    saved = weights(out)
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, saved[f"backbone.{name}"]), name

    with pytest.raises(UserError, match="--resume to continue"):
        train(make_config(**options(shards, out)))
    stamp = (out / "backbone.safetensors").stat().st_mtime_ns
    assert train(make_config(**options(shards, out, resume=True))) == out  # finished, same options: nothing to do
    assert train(make_config(**options(f"{shards}/.", out, resume=True))) == out  # the same shards, spelt otherwise
    assert (out / "backbone.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"lr: 0\.05 there, 0\.1 now.*seed: 1 there, 2 now"):
        train(make_config(**options(shards, out, resume=True, lr=0.1, seed=2)))
    train(make_config(**options(shards, out, overwrite=True, epochs=1, warmup_epochs=0.0)))
    assert log_steps(out) == list(range(1, 7))


def test_a_one_split_knn_source_is_refused_with_a_fix_training_has(shards, tmp_path):
    """The monitor scores a test split against a train split: a one-split source is refused before anything is
    written, with a fix `clsp train run` has (the source's own message points to eval's --test-source)."""
    import numpy as np

    from conftest import write_hf_parquet

    one_split = tmp_path / "labelled.parquet"
    write_hf_parquet(one_split, [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(4)], [0, 1, 0, 1])
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"--knn-source parquet:.* is one split .*drop --knn-every and --knn-source "
                                        r".*clsp eval knn"):
        train(make_config(**options(shards, out, knn_every=1, knn_source=f"parquet:{one_split}")))
    with pytest.raises(UserError, match=r"--knn-source is used only with --knn-every N"):  # it ran without a monitor
        train(make_config(**options(shards, out, knn_source="digits")))
    assert not out.exists()


def test_a_streamed_run_is_refused_where_the_split_of_its_batches_over_loader_processes_changed(shards, tmp_path):
    """Loader processes take batches in proportion to their shards' anchors (train.stream STREAM_PLAN); clsp 0.3.0
    gave each the same number. Where the two differ the record says so (data.stream_plan) and a run 0.3.0 began is
    refused rather than switched mid-run; where they agree (one loader process, shards that split evenly) the
    record is 0.3.0's, and such runs go on."""
    one_epoch = dict(epochs=1, warmup_epochs=0.0, cache=False)
    uneven = tmp_path / "uneven"  # COUNTS (10, 7, 9) over 2 loader processes: 2 shards for one, 1 for the other
    train(make_config(**options(shards, uneven, workers=2, **one_epoch)))
    record = read_json(uneven / "config.json")
    assert record["data"]["stream_plan"] == 2
    del record["data"]["stream_plan"]  # as clsp 0.3.0 wrote it
    (uneven / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"data\.stream_plan: absent there, 2 now\): its loader processes split the "
                                        r"batches as clsp <= 0.3.0 did, .*finish it with that version, another --out"):
        train(make_config(**options(shards, uneven, workers=2, resume=True, **one_epoch)))
    even = build_shard_dir(tmp_path / "even", counts=(9, 9), k=2)  # 18 anchors: 4 batches, 2 for each process
    for folder, workers in ((shards, 1), (even, 2)):
        out = tmp_path / f"same-{workers}"
        train(make_config(**options(folder, out, workers=workers, **one_epoch)))
        assert "stream_plan" not in read_json(out / "config.json")["data"]
        assert train(make_config(**options(folder, out, workers=workers, resume=True, **one_epoch))) == out


def test_a_run_begun_with_kornias_augmentation_is_refused_rather_than_resumed_with_other_draws(shards, tmp_path):
    """The views' random draws changed when the kornia modules gave way to train.augment's one draw per sample; the
    record says which made a run (augment_draws, absent before), so a run is never continued with the other."""
    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0)))
    record = read_json(out / "config.json")
    assert record["augment_draws"] == 2
    del record["augment_draws"]
    (out / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"augment_draws: absent there, 2 now\): its views were augmented by kornia's "
                                        r"modules as clsp <= 0.3.0 did, .*finish it with that version"):
        train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, resume=True)))


def test_a_byol_run_begun_on_simclrs_augmentation_is_refused_rather_than_resumed_on_byols(shards, tmp_path):
    """BYOL and NNCLR trained on SimCLR's recipe before they took BYOL's: the record's augment says which."""
    out = tmp_path / "run"
    train(make_config(**options(shards, out, method="byol", epochs=1, warmup_epochs=0.0)))
    record = read_json(out / "config.json")
    assert record["augment"] == "byol"
    (out / "config.json").write_text(json.dumps({**record, "augment": "simclr"}))
    with pytest.raises(UserError, match=r"augment: 'simclr' there, 'byol' now\): BYOL and NNCLR runs begun before "
                                        r"they trained on BYOL's recipe were augmented with SimCLR's"):
        train(make_config(**options(shards, out, method="byol", epochs=1, warmup_epochs=0.0, resume=True)))


def test_a_run_is_resumed_only_on_the_kind_of_device_and_precision_it_began_with(shards, tmp_path):
    """--bf16 is on by default and takes effect on a GPU only, so the options alone do not say how a run computed: a
    CPU run resumed on a GPU would switch to bf16 autocast and the GPU's random generator, a GPU run resumed on a CPU
    to fp32, both silently. The record holds the device and precision the steps ran with (absent in older records,
    which resume as before)."""
    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0)))
    record = read_json(out / "config.json")
    assert record["config"]["bf16"] is True
    assert record["compute"] == {"device": "cpu", "precision": "fp32", "threads": torch.get_num_threads()}
    (out / "config.json").write_text(json.dumps({**record, "compute": {"device": "cuda", "precision": "bf16"}}))
    with pytest.raises(UserError, match=r"compute.device: 'cuda' there, 'cpu' now; compute.precision: 'bf16' there, "
                                        r"'fp32' now\): a run goes on on the kind of device it began on .* resume it "
                                        r"on a machine like the first; bf16 autocast runs on a GPU only"):
        train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, resume=True)))
    del record["compute"]
    (out / "config.json").write_text(json.dumps(record))
    assert train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, resume=True))) == out


def test_a_cpu_run_resumed_on_another_thread_count_says_so_and_goes_on(shards, tmp_path, capsys):
    """A CPU run's weights depend on its thread count: the record holds it, and a resume on another count is said (not
    refused: it is still a sound run of its config); a record from before the count was kept resumes without a word."""
    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=2, warmup_epochs=0.0)))
    record = read_json(out / "config.json")
    threads = torch.get_num_threads()
    assert record["compute"]["threads"] == threads
    (out / "summary.json").unlink()  # as if stopped before its end, so that the resume trains
    for began, said in ((threads + 3, True), (None, False), (threads, False)):
        compute = {"device": "cpu", "precision": "fp32", **({} if began is None else {"threads": began})}
        (out / "config.json").write_text(json.dumps({**record, "compute": compute}))
        capsys.readouterr()
        train(make_config(**options(shards, out, epochs=2, warmup_epochs=0.0, resume=True)))
        shown = capsys.readouterr().err
        assert (f"trained on {threads + 3} CPU thread(s) per process and goes on on {threads}" in shown) == said
        assert ("OMP_NUM_THREADS" in shown) == said
        assert read_json(out / "config.json")["compute"]["threads"] == threads  # the count it goes on with
        (out / "summary.json").unlink()


def test_each_method_records_its_own_settings_and_older_records_still_resume(shards, tmp_path):
    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0)))
    record = read_json(out / "config.json")
    assert set(record["method"]) == {"positives", "lam", "temperature", "proj_hidden", "proj_dim", "proj_bn"}
    # clsp < 0.3 recorded every method's settings for every method; those SimCLR lacks never took part in the run
    record["method"].update(queue_size=0, pred_hidden=4096, momentum_base=0.99, momentum_final=0.999)
    (out / "config.json").write_text(json.dumps(record))
    assert train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, resume=True))) == out
    record["method"]["temperature"] = 0.5  # a setting the method has still decides whether it is the same run
    (out / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="temperature"):
        train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, resume=True)))
    with pytest.raises(UserError, match="--temperature does not apply to byol: its settings are lam, proj_dim"):
        make_config(**options(shards, out, method="byol", temperature=0.1))
    assert make_config(preset="embedded", shards=str(shards), out=str(out)).method_config().lam == 0.2  # its queue
    # size is for MoCo and NNCLR; SimCLR leaves it out



def test_a_synth_rerun_that_records_the_generators_configs_keeps_the_runs_on_its_shards(shards, tmp_path):
    """A synth rerun adds the generator's config digests to an older manifest (the shards stay byte for byte): its
    runs must still resume and read as finished, not as trained on other data (their record named the manifest's
    whole generator section)."""
    import shutil

    from clsp.shards.manifest import read_manifest
    from clsp.shards.manifest_writer import write_manifest

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    one_epoch = dict(epochs=1, warmup_epochs=0.0)
    run = train(make_config(**options(copy, tmp_path / "run", **one_epoch)))
    made = read_manifest(copy).run
    write_manifest(copy, {**made, "generator": {**made["generator"], "scheduler_sha256": "1" * 64,
                                                "unet_config_sha256": "2" * 64}})
    assert train(make_config(**options(copy, run, resume=True, **one_epoch))) == run  # "already finished"
    assert read_json(run / "config.json")["data"]["generator"] == {"model_id": "none", "weights_sha256": "0" * 64}

def test_a_streamed_run_resumes_only_with_its_loader_processes_and_a_cached_one_with_any(shards, tmp_path):
    one_epoch = dict(epochs=1, warmup_epochs=0.0)
    streamed = tmp_path / "streamed"  # each loader process reads its own shards: the count decides the order
    train(make_config(**options(shards, streamed, cache=False, workers=2, **one_epoch)))
    record = read_json(streamed / "config.json")
    assert record["data"]["stream_workers"] == 2 and record["method_state"] == 1
    with pytest.raises(UserError, match="stream_workers"):
        train(make_config(**options(shards, streamed, cache=False, workers=1, resume=True, **one_epoch)))
    del record["data"]["stream_workers"], record["method_state"]  # as clsp 0.3.0 wrote them: config.workers decides
    (streamed / "config.json").write_text(json.dumps(record))
    assert train(make_config(**options(shards, streamed, cache=False, workers=2, resume=True, **one_epoch))) == streamed
    with pytest.raises(UserError, match="stream_workers"):
        train(make_config(**options(shards, streamed, cache=False, workers=3, resume=True, **one_epoch)))
    cached = tmp_path / "cached"  # no loader processes: --workers changes nothing
    train(make_config(**options(shards, cached, cache=True, workers=0, **one_epoch)))
    assert "stream_workers" not in read_json(cached / "config.json")["data"]
    assert train(make_config(**options(shards, cached, cache=True, workers=2, resume=True, **one_epoch))) == cached


def test_a_moco_run_of_the_shared_queue_layout_is_refused_naming_it(shards, tmp_path):
    out = tmp_path / "moco"
    moco = dict(method="moco", queue_size=16, epochs=1, warmup_epochs=0.0)
    train(make_config(**options(shards, out, **moco)))
    record = read_json(out / "config.json")
    assert record["method_state"] == 2
    del record["method_state"]  # a MoCo run begun with one queue for both views
    (out / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="method_state"):
        train(make_config(**options(shards, out, resume=True, **moco)))


def test_a_run_after_another_with_other_precision_in_the_same_process_trains(shards, tmp_path):
    # Accelerate keeps one state per process: a bf16 run (the default on a GPU) followed by an fp32 one in the same
    # process (eval study, this test suite on a GPU machine) was refused with "AcceleratorState has already been
    # initialized". A bf16 Accelerator on the CPU reproduces that without a GPU.
    from accelerate.state import AcceleratorState

    from clsp.accelerator import fresh_accelerator

    fresh_accelerator(cpu=True, mixed_precision="bf16")  # what a GPU run leaves behind in this process
    assert AcceleratorState().mixed_precision == "bf16"
    out = tmp_path / "after-bf16"
    assert train(make_config(**options(shards, out, epochs=1, bf16=False))) == out
    assert AcceleratorState().mixed_precision == "no"  # the fp32 run did not inherit bf16
    assert log_steps(out) == list(range(1, 7))


def test_sigkill_after_a_checkpoint_then_resume_gives_the_uninterrupted_weights(shards, tmp_path):
    moco = dict(method="moco", queue_size=16)  # queue and momentum encoder must survive the restart too
    train(make_config(**options(shards, tmp_path / "straight", **moco)))
    killed = tmp_path / "killed"
    spec = tmp_path / "killed.json"
    spec.write_text(json.dumps(options(shards, killed, **moco)))
    result = subprocess.run([sys.executable, str(WORKER), str(spec), "--after-step", "8", "kill"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert read_json(killed / "checkpoint" / "position.json")["epoch"] == 1 and not (killed / "summary.json").exists()
    train(make_config(**options(shards, killed, resume=True, **moco)))
    assert_same_weights(tmp_path / "straight", killed)
    assert log_steps(killed) == list(range(1, 19))  # rows written after the checkpoint were not duplicated


@pytest.mark.parametrize("cache", [False, True], ids=["streamed-2-workers", "cached"])
def test_sigterm_mid_epoch_checkpoints_there_and_resume_matches(shards, tmp_path, cache):
    two_workers = dict(workers=2, shuffle_buffer=5, cache=cache)
    train(make_config(**options(shards, tmp_path / "straight", **two_workers)))
    stopped = tmp_path / "stopped"
    with sigterm_after_step(9), pytest.raises(UserError, match="SIGTERM after step 10"):
        train(make_config(**options(shards, stopped, **two_workers)))
    assert read_json(stopped / "checkpoint" / "position.json") == {"epoch": 1, "step": 4, "global_step": 10}
    train(make_config(**options(shards, stopped, resume=True, **two_workers)))
    assert_same_weights(tmp_path / "straight", stopped)


def log_rows(run: Path) -> list[dict]:
    """log.csv's rows without the one column that depends on the machine's speed."""
    with open(run / "log.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(handle)]


def test_a_sigterm_on_an_epochs_last_step_ends_that_epoch_first_and_on_the_runs_last_one_finishes_it(shards, tmp_path):
    """A stop on an epoch's last step saved the next epoch's checkpoint from within the step, so that epoch's kNN
    monitor never ran (its log row had none), and on the run's last step the resumed run's summary had neither final
    loss nor kNN. Now the epoch's own work comes first, and the log and summary are the uninterrupted run's."""
    knn = dict(knn_every=1, knn_source="digits")  # 6 steps an epoch, 3 epochs
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(make_config(**options(shards, straight, **knn)))
    with sigterm_after_step(5), pytest.raises(UserError, match="SIGTERM after step 6; a checkpoint was saved"):
        train(make_config(**options(shards, stopped, **knn)))
    assert read_json(stopped / "checkpoint" / "position.json") == {"epoch": 1, "step": 0, "global_step": 6}
    assert log_rows(stopped) == log_rows(straight)[:6] and log_rows(stopped)[5]["knn_top1_pct"]
    with sigterm_after_step(11):  # the resumed launch's 11th step is the run's 17th: seen at its last, it finishes
        assert train(make_config(**options(shards, stopped, resume=True, **knn))) == stopped
    assert log_rows(stopped) == log_rows(straight)
    launch = ("wall_s_this_launch", "steps_per_rank_this_launch")
    summary = {k: v for k, v in read_json(stopped / "summary.json").items() if k not in launch}
    assert summary == {k: v for k, v in read_json(straight / "summary.json").items() if k not in launch}
    assert summary["final_loss"] is not None and summary["knn_top1_pct"] is not None
    assert_same_weights(straight, stopped)


def test_a_run_stopped_after_its_last_checkpoint_and_before_its_summary_gets_the_summary_figures(shards, tmp_path):
    """The resumed launch takes no step: the summary's final loss and kNN come from the log's last row (as it
    holds them, to 6 significant digits)."""
    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, knn_every=1, knn_source="digits")))
    straight = read_json(out / "summary.json")
    (out / "summary.json").unlink()  # where a kill between the backbone and the summary leaves the run
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, knn_every=1, knn_source="digits",
                                resume=True)))
    resumed = read_json(out / "summary.json")
    assert resumed["finished"] and resumed["steps_per_rank_this_launch"] == [0]
    for key in ("final_loss", "knn_top1_pct"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5) and straight[key] is not None, key


def test_a_resume_at_the_last_step_drops_a_superseded_checkpoint_and_a_stop_in_the_final_writes_lets_them_end(
        shards, tmp_path, monkeypatch):
    """A kill between save_checkpoint's renames left .checkpoint.old, which a resume at the last step (no checkpoint
    saved) kept for good; a SIGTERM while the backbone and summary were written killed the run with no word."""
    import shutil

    import clsp.train.loop
    from clsp.accelerator import StopFlag

    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0)))
    (out / "summary.json").unlink()
    (out / "checkpoint").rename(out / ".checkpoint.old")  # a kill between the renames: the old one is the last
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, resume=True)))  # from the old one
    assert (out / "summary.json").is_file() and (out / "checkpoint" / "position.json").is_file()
    assert not (out / ".checkpoint.old").exists()  # under its own name again
    (out / "summary.json").unlink()
    shutil.copytree(out / "checkpoint", out / ".checkpoint.old")  # a kill after the renames, before the delete
    saving = clsp.train.loop.save_backbone

    def stopped_while_saving(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return saving(*args)

    monkeypatch.setattr(clsp.train.loop, "save_backbone", stopped_while_saving)
    stop_flag = StopFlag()
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, resume=True)), stop_flag)
    assert stop_flag.raised and stop_flag.by == "SIGTERM"  # taken as a flag: the run finished its writes
    assert read_json(out / "summary.json")["finished"] and not (out / ".checkpoint.old").exists()


@pytest.mark.parametrize("fault", ["term-group", "int-group", "kill-loader", "kill"])
def test_a_stop_that_reaches_the_loader_processes_resumes_to_the_uninterrupted_weights(shards, tmp_path, fault):
    """Streamed by 2 loader processes, in a process group of its own:
    - term-group: a scheduler's SIGTERM reaches the loader processes too; they leave stopping to the training process,
      which checkpoints after its step (a loader that died of it ended the run mid-step: traceback, no checkpoint);
    - int-group: a terminal's Ctrl-C, likewise (it was a KeyboardInterrupt: no checkpoint since the epoch's start);
    - kill-loader: a loader process killed (the out-of-memory killer) ends the run with one error line naming the
      checkpoint to resume from (was a traceback);
    - kill: after a kill -9 the orphaned loader processes live on for seconds, but the folder's lock is free at once
      (their inherited copy was closed when they were forked), so --resume works straight away (was "in use"), and
      removes the temp files of writes the kill cut short (they stayed)."""
    streamed = dict(workers=2, shuffle_buffer=5, cache=False)
    train(make_config(**options(shards, tmp_path / "straight", **streamed)))
    out, spec, stderr = tmp_path / "stopped", tmp_path / "spec.json", tmp_path / "stderr.txt"
    spec.write_text(json.dumps(options(shards, out, **streamed)))
    with open(stderr, "w") as errors:  # not a pipe: orphaned loader processes would hold it open
        returncode = subprocess.run([sys.executable, str(WORKER), str(spec), "--after-step", "9", fault], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=errors, timeout=120,
                                    start_new_session=True, preexec_fn=as_a_terminals_job).returncode
    message = stderr.read_text()
    position = read_json(out / "checkpoint" / "position.json")
    cut = [out / f".{name}.tmp-{dead_pid()}" for name in ("log.csv", "backbone.safetensors", "summary.json")]
    if fault == "kill":
        assert returncode == -signal.SIGKILL, message[-2000:]
        assert not lock_held(out)  # checked before the orphans have noticed (within 5 s) that their parent died
        for path in cut:  # writes a kill -9 cut short: --resume removes them
            path.write_bytes(b"half")
    else:
        assert returncode == 2 and "Traceback" not in message, message[-2000:]
    if fault in ("term-group", "int-group"):
        by = "SIGTERM" if fault == "term-group" else "Ctrl-C"
        assert f"error: stopped by {by} after step 10; a checkpoint was saved" in message, message[-2000:]
        assert position == {"epoch": 1, "step": 4, "global_step": 10}
    if fault == "kill-loader":
        assert re.search(r"error: a loader process died: (DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal: "
                         r"Killed|exited unexpectedly)|its connection was cut \(\w+: [^)]*\))\. "  # torch's three
                         # wordings: which part of it notices first is a race
                         r".* holds a training run \(checkpoint after step 6\): rerun the same command with "
                         r"--resume", message), message
        assert position == {"epoch": 1, "step": 0, "global_step": 6}
    train(make_config(**options(shards, out, resume=True, **streamed)))
    assert_same_weights(tmp_path / "straight", out)
    assert not any(path.exists() for path in cut)


@pytest.mark.parametrize("raised_by", ["the-fetch", "a-loader", "the-step"])
def test_a_connection_cut_by_a_dying_loader_is_told_as_its_death(shards, tmp_path, monkeypatch, raised_by):
    """A loader process killed after queuing a batch, before the training process took over the batch's shared memory:
    the handover's connection is reset (seen on a loaded machine, a third wording beside torch's two). It ends the run
    with the same one error line as a loader's death. A ConnectionError a loader raised itself (reading shards over a
    network) is the loader's error, and one the training process raised outside the fetch (a user's hook posting
    metrics, a tracker) is its own: both are passed on as they are."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    fetch, steps, epochs = _MultiProcessingDataLoaderIter._next_data, [], []
    message = {"the-fetch": "[Errno 104] Connection reset by peer", "the-step": "metrics server refused the connection",
               "a-loader": "Caught ConnectionResetError in DataLoader worker process 0.\nOriginal Traceback ..."}

    def next_data(self):  # the batch handover: the first of the second epoch (3 epochs x 6 steps)
        epochs.extend([self] * (self not in epochs))
        if raised_by != "the-step" and len(epochs) == 2:
            raise ConnectionResetError(message[raised_by])
        return fetch(self)

    def users_hook(optimizer, args, kwargs):  # after each optimizer step
        steps.append(len(steps))
        if raised_by == "the-step" and len(steps) == 7:
            raise ConnectionRefusedError(111, message[raised_by])

    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "_next_data", next_data)
    hook = register_optimizer_step_post_hook(users_hook)
    out = tmp_path / "run"
    config = make_config(**options(shards, out, workers=2, shuffle_buffer=5, cache=False))
    try:
        if raised_by != "the-fetch":
            with pytest.raises(ConnectionError, match=re.escape(message[raised_by])):
                train(config)
            return
        with pytest.raises(UserError, match=r"a loader process died: its connection was cut \(ConnectionResetError: "
                                            r"\[Errno 104\] Connection reset by peer\)\. .* holds a training run "
                                            r"\(checkpoint after step 6\): rerun the same command with --resume"):
            train(config)
    finally:
        hook.remove()
    assert len(steps) == 6 and read_json(out / "checkpoint" / "position.json")["epoch"] == 1


class _SlowCount(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(1000):
            time.sleep(0.05)
            yield torch.tensor([i])


def _iterator_with_a_dead_loader():
    """A DataLoader iterator with 2 loader processes, one killed and not yet reaped, its SIGCHLD not taken by torch's
    handler: as when the training process learns of the death by a cut connection before the signal."""
    from torch.utils.data import DataLoader

    batches = iter(DataLoader(_SlowCount(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
    next(batches)
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        victim = batches._workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{victim.pid}/stat").read_text().split(") ")[1][0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)  # dead, not reaped: torch's check reads how it died
    finally:
        signal.signal(signal.SIGCHLD, handler)
    return batches


@pytest.mark.skipif(sys.platform != "linux", reason="waits for the killed loader process in /proc (Linux only)")
def test_a_dead_loaders_iterator_is_stopped_without_a_traceback_at_exit(monkeypatch):
    """After a loader process died (its death told by a cut connection), the iterator's __del__ at exit ended the
    workers under torch's SIGCHLD handler, which raised "DataLoader worker ... is killed by signal": a traceback
    after the run's one error line (seen in CI). The training process now ends them at once, and the check that
    torch's handler runs has nothing left to raise about."""
    import gc

    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails  # what the SIGCHLD handler runs

    from clsp.accelerator import stop_loader_processes

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    batches = _iterator_with_a_dead_loader()
    workers = list(batches._workers)
    stop_loader_processes(batches)
    assert not any(worker.is_alive() for worker in workers)  # ended now, not at exit
    _error_if_any_worker_fails()  # what the next SIGCHLD runs: nothing left to raise about
    del batches
    gc.collect()
    assert not unraisable, [str(u.exc_value) for u in unraisable]
    stop_loader_processes(iter([1, 2]))  # anything but a loader iterator with processes is left alone


def _loader_like(ready, parent: int) -> None:
    stop_only_when_the_parent_says(0, parent)
    ready.set()
    time.sleep(60)


def _start_loader_like(parent: int):
    import multiprocessing

    context = multiprocessing.get_context("fork")  # as train.shard_input asks the DataLoader to start its workers
    ready = context.Event()
    loader = context.Process(target=_loader_like, args=(ready, parent), daemon=True)
    loader.start()
    assert ready.wait(30)
    return loader


def test_a_loader_process_ignores_stop_signals_from_others_but_obeys_its_parents_sigterm():
    """The DataLoader ends a stuck worker with SIGTERM (Process.terminate): that one still works; and once its parent
    is gone (kill -9), an orphan obeys anyone's SIGTERM again."""
    loader = _start_loader_like(os.getpid())
    try:
        subprocess.run(["kill", "-TERM", str(loader.pid)], check=True)  # sent by another process: a scheduler's
        os.kill(loader.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches the whole group
        loader.join(1.0)
        assert loader.exitcode is None  # alive
        loader.terminate()  # SIGTERM from its parent
        loader.join(30)
        assert loader.exitcode == 0
    finally:
        loader.kill()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    orphan = _start_loader_like(gone.pid)  # its recorded parent is not its parent any more
    try:
        subprocess.run(["kill", "-TERM", str(orphan.pid)], check=True)
        orphan.join(30)
        assert orphan.exitcode == 0
    finally:
        orphan.kill()


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    with pytest.raises(UserError, match=r"non-finite at step \d+ .*training stopped and no checkpoint had been saved "
                                        r"yet\. Lower --lr"):  # not "the last good checkpoint is kept": none was
        train(make_config(**options(shards, tmp_path / "huge", lr=1e30, warmup_epochs=0.0)))
    assert not (tmp_path / "huge" / "checkpoint").exists() and not (tmp_path / "huge" / "backbone.safetensors").exists()

    def poison(optimizer) -> None:  # a weight turns NaN after step 7 (in epoch 2): step 8's loss is NaN
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    out = tmp_path / "poisoned"
    handle = on_optimizer_step(7, poison)
    try:
        with pytest.raises(UserError, match="non-finite at step 8 .*the last good checkpoint in .* is kept"):
            train(make_config(**options(shards, out)))
    finally:
        handle.remove()
    assert read_json(out / "checkpoint" / "position.json")["epoch"] == 1  # not overwritten after the NaN
    assert all(torch.isfinite(t).all() for t in weights(out).values())
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "backbone.safetensors")).values())
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
def test_a_corrupt_shard_is_named_or_skipped_and_counted(tmp_path, cache):
    directory = build_shard_dir(tmp_path / "shards", counts=COUNTS, k=2)
    broken = directory / "shard-000001.tar"
    broken.write_bytes(broken.read_bytes()[:700])
    with pytest.raises(UserError, match="shard-000001.tar.*--skip-corrupt"):
        train(make_config(**options(directory, tmp_path / "run", epochs=1, warmup_epochs=0.0, cache=cache)))
    train(make_config(**options(directory, tmp_path / "run", epochs=1, warmup_epochs=0.0, skip_corrupt=True,
                                overwrite=True, cache=cache)))
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["skipped_shards"] == ["shard-000001.tar"] and summary["steps"] == 6


def test_two_processes_under_torchrun_take_equal_steps(shards, tmp_path):
    out = tmp_path / "ddp"
    spec = tmp_path / "ddp.json"
    spec.write_text(json.dumps(options(shards, out, epochs=2, warmup_epochs=0.5)))
    (losses := tmp_path / "losses").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(spec), "--record-losses", str(losses)]
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # two gloo processes, also on a machine with one GPU
    result = subprocess.run(command, cwd=REPO, env=cpu_only, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr  # torch's about DDP's broadcast_buffers, once per process
    summary = read_json(out / "summary.json")
    # --batch-size 4 is global: 2 anchors per process a step, 26 // (2 * 2) = 6 steps an epoch on each process
    assert summary["world_size"] == 2 and summary["steps_per_rank_this_launch"] == [12, 12]
    assert log_steps(out) == list(range(1, 13))
    assert {p.name for p in (out / "checkpoint").glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    # the logged loss is the mean of the two processes' losses on their own anchors, not the first process's
    own = [[float(line) for line in (losses / f"rank-{rank}.txt").read_text().split()] for rank in (0, 1)]
    with open(out / "log.csv", newline="") as handle:
        logged = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(own[0]) == len(own[1]) == 12 and own[0] != own[1]
    assert logged == pytest.approx([(a + b) / 2 for a, b in zip(*own)], rel=6e-6)  # log.csv: 6 digits
    # one process goes on from it: refused, naming what to do (it said "pass the same options", which were)
    with pytest.raises(UserError, match=r"data.world_size: 2 there, 1 now.*relaunch it so, e.g. `accelerate launch "
                                        r"--num_processes N") as refused:
        train(make_config(None, **{**options(shards, out, epochs=2, warmup_epochs=0.5), "resume": True}))
    assert "pass the same options" not in str(refused.value)
    # the command again on its two processes: the finished run is named once on stdout, not once per process
    flags = ["--width", "4", "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--warmup-epochs", "0.5",
             "--proj-hidden", "16", "--proj-dim", "8", "--workers", "0", "--seed", "1", "--resume"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "clsp.train.cli", "run", str(shards), "--out", str(out), *flags]
    again = subprocess.run(command, cwd=REPO, env=cpu_only, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == [str(out)]


def test_cli_applies_the_preset_under_explicit_options(shards, tmp_path):
    from clsp.train.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["run", str(shards), "--out", str(out), "--preset", "embedded", "--width", "4",
                                      "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--proj-hidden",
                                      "8", "--workers", "0"])
    assert result.exit_code == 0, result.output
    # stdout: the run folder alone (for RUN=$(...)); stderr: how the run ended and what it wrote (it said nothing)
    assert result.stdout.splitlines() == [str(out)]
    assert re.search(rf"{re.escape(str(out))}: finished 6 steps, final loss \d+\.\d{{4}}; wrote backbone.safetensors "
                     rf"and summary.json", result.stderr), result.stderr
    config = read_json(out / "config.json")["config"]
    assert config["width"] == 4 and config["batch_size"] == 4 and config["proj_dim"] == 128  # 128: from the preset
    result = CliRunner().invoke(app, ["run", str(shards), "--out", str(out), "--positives", "sometimes"])
    assert isinstance(result.exception, UserError) and "--positives" in str(result.exception)



def test_compile_keeps_the_checkpoint_names_and_the_numbers_and_a_cpu_run_refuses_it(shards, tmp_path):
    from clsp.train.methods import build_method
    from clsp.train.speed import compile_encoders, to_view_layout, view_layout

    out = tmp_path / "compiled"
    with pytest.raises(UserError, match="--compile is for GPU runs.*pytorch/pytorch#181618"):
        train(make_config(**options(shards, out, epochs=1, compile=True)))
    assert not out.exists()  # refused before anything was written

    def simclr() -> torch.nn.Module:
        torch.manual_seed(0)
        backbone, feat_dim = build_backbone("resnet18", 4, small_stem=True)
        return build_method("simclr", backbone, feat_dim)

    def loss_and_grads(method):
        views, ids = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(v)) for v in range(3)], \
            torch.arange(4)
        loss = method(views[:2], ids, views[2])["loss"]
        loss.backward()
        return float(loss.detach()), {n: p.grad for n, p in method.named_parameters()}

    eager, compiled = simclr(), simclr()
    # dynamo's tracing and AOTAutograd, as on a GPU; aot_eager runs the traced graph without inductor's CPU code
    assert compile_encoders(compiled, backend="aot_eager") == ["backbone"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no "_orig_mod.": checkpoints load either way
    (loss_e, grads_e), (loss_c, grads_c) = loss_and_grads(eager), loss_and_grads(compiled)
    assert loss_c == pytest.approx(loss_e, abs=1e-5)
    assert max(float((grads_e[n] - grads_c[n]).abs().max()) for n in grads_e) < 1e-4
    assert view_layout(torch.device("cuda")) == torch.channels_last  # NHWC views for cuDNN; the CPU keeps NCHW
    views = torch.zeros(2, 3, 4, 4)
    assert to_view_layout(views) is views


def test_an_overwrite_killed_midway_never_leaves_a_finished_run_without_its_backbone(shards, tmp_path, monkeypatch):
    """--overwrite deleted backbone.safetensors before summary.json: killed between, the folder read as finished, and
    the old command (--resume) said "nothing to do" and left it without a backbone."""
    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=1)))
    real_unlink = Path.unlink
    for n in range(1, 100):  # a kill before the n-th deletion, until an overwrite deletes all it deletes
        deleted = []

        def killed_before(path, missing_ok=False):
            if len(deleted) + 1 == n:
                raise SystemExit("kill -9")
            deleted.append(path.name)
            real_unlink(path, missing_ok=missing_ok)

        with monkeypatch.context() as m:
            m.setattr(Path, "unlink", killed_before)
            try:
                train(make_config(**options(shards, out, epochs=1, lr=0.02, overwrite=True)))
                break
            except SystemExit:
                pass
        assert not (out / "summary.json").exists() or (out / "backbone.safetensors").exists(), deleted
        train(make_config(**options(shards, out, epochs=1, resume=True)))  # the old command again: finishes it
        assert (out / "summary.json").exists() and (out / "backbone.safetensors").exists(), deleted
    assert n > 8  # every deletion was cut once


def test_a_checkpoint_that_lost_its_weights_is_refused_in_words(shards, tmp_path):
    """position.json vouches for a complete checkpoint: without model.safetensors beside it, a resume was a
    FileNotFoundError traceback."""
    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=2)))
    for name in ("summary.json", "backbone.safetensors", "checkpoint/model.safetensors"):
        (out / name).unlink()
    with pytest.raises(UserError, match=r"model.safetensors cannot be loaded \(.*No such file"):
        train(make_config(**options(shards, out, epochs=2, resume=True)))


def test_a_resume_without_a_checkpoint_on_another_thread_count_says_nothing(shards, tmp_path, capsys):
    """A run stopped before its first checkpoint begins again from its first step: on the new count it is an
    uninterrupted run, so no note that its weights will differ from one."""
    import shutil

    out = tmp_path / "run"
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0)))
    record = read_json(out / "config.json")
    shutil.rmtree(out / "checkpoint")
    (out / "summary.json").unlink()
    (out / "config.json").write_text(json.dumps({**record, "compute": {**record["compute"],
                                                                       "threads": torch.get_num_threads() + 3}}))
    capsys.readouterr()
    train(make_config(**options(shards, out, epochs=1, warmup_epochs=0.0, resume=True)))
    assert "OMP_NUM_THREADS" not in capsys.readouterr().out
