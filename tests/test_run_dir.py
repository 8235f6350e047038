"""clsp.run_dir, the one output-folder rule of every stage: foreign folders refused untouched, an exclusive lock that
names its holder and dies with it, identity vs operational fields on resume, --overwrite deleting only our own files,
a failed fresh run leaving nothing, and atomic writes that leave nothing half-written."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import clsp.run_dir
from clsp.errors import UserError
from clsp.file_checks import owned_files, starts_with
from clsp.file_io import write_atomic
from clsp.run_dir import LOCK_FILE, RunKind, prepare_run_dir, read_record
from conftest import dead_pid, snapshot

DEMO = RunKind("demo", "demo.json", "clsp demo run", describe=lambda out: "a demo run", operational=("workers",),
               owned=lambda out: owned_files(out, {"**/*.txt": starts_with(b"demo:")}))  # ours: .txt saying "demo:"
RECORD = {"lr": 0.1, "model": {"width": 4}, "workers": 2}


def claim(out: Path, record: dict = RECORD, resume: bool = False, overwrite: bool = False):
    return prepare_run_dir(out, record, DEMO, resume=resume, overwrite=overwrite)


def test_a_folder_that_is_not_ours_is_refused_and_left_as_it_was(tmp_path):
    folder = tmp_path / "users"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"mine": true}')
    (folder / "index.parquet").write_bytes(b"my table")
    (folder / ".tmp-notes").write_text("keep")
    (folder / "log.csv").write_text("a,b\n1,2\n")
    before = snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not empty and was not made by `clsp demo run`.*new or empty directory"):
            claim(folder, overwrite=overwrite)
    assert snapshot(folder) == before and not (folder / LOCK_FILE).exists()

    other = tmp_path / "other-kind"  # a folder of another stage (e.g. a generator given as a synth --out)
    other.mkdir()
    (other / "train_config.json").write_text(json.dumps({"clsp_run": "generator", "steps": 4}))
    with pytest.raises(UserError, match=r"holds a clsp generator run \(train_config.json\), not a demo run"):
        claim(other, overwrite=True)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        claim(a_file)
    with pytest.raises(UserError, match="lies under .*file, which is a file"):
        claim(a_file / "sub")
    assert a_file.read_text() == "x"


def test_resume_compares_identity_fields_and_lets_operational_ones_change(tmp_path):
    out = tmp_path / "run"
    with claim(out) as first:
        assert not first.resumed
    assert read_record(out, DEMO) == {"clsp_run": "demo", **RECORD}
    with pytest.raises(UserError, match=r"already holds a demo run with these settings: pass --resume"):
        claim(out)
    with pytest.raises(UserError, match=r"another config \(lr: 0\.1 there, 0\.2 now; model\.width: 4 there, 8 now\)"
                                        r".*--overwrite"):
        claim(out, {**RECORD, "lr": 0.2, "model": {"width": 8}}, resume=True)
    with claim(out, {**RECORD, "workers": 0}, resume=True) as again:  # an operational field may differ
        assert again.resumed
    assert read_record(out, DEMO)["workers"] == 0


def test_overwrite_deletes_only_the_files_recognised_as_ours(tmp_path):
    out = tmp_path / "run"
    with claim(out):
        (out / "result.txt").write_text("demo: 0.9")
        (out / "sub").mkdir()
        (out / "sub" / "part.txt").write_text("demo: part")
    (out / "notes.txt").write_text("the user's own notes")  # a .txt by name, not ours by content
    with claim(out, {**RECORD, "lr": 0.5}, overwrite=True) as replaced:
        assert not replaced.resumed
    assert sorted(snapshot(out)) == [LOCK_FILE, "demo.json", "notes.txt"]
    assert not (out / "sub").exists()  # emptied by the overwrite, so removed
    assert read_record(out, DEMO)["lr"] == 0.5


def test_a_claim_or_an_overwrite_killed_midway_leaves_a_folder_the_next_command_takes(tmp_path, monkeypatch):
    """kill -9 while a fresh claim writes its record leaves the lock and the record's temp file; kill -9 during
    --overwrite's deletions leaves some of the old files. Neither may turn the folder into one every later command
    refuses as "not made by clsp": the record's temp file is not a stranger's, and the record is never deleted."""
    from clsp.file_checks import json_with

    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / LOCK_FILE).write_text("")
    (tmp_path / "cut" / f".demo.json.tmp-{dead_pid()}").write_text('{"clsp_run": "de')  # the dead writer's half
    with claim(tmp_path / "cut"):
        pass
    assert sorted(snapshot(tmp_path / "cut")) == [LOCK_FILE, "demo.json"]

    kind = RunKind("demo", "demo.json", "clsp demo run", describe=lambda out: "a demo run",
                   owned=lambda out: owned_files(out, {"*.txt": starts_with(b"demo:"), "demo.json": json_with("x")}))
    out = tmp_path / "run"
    with prepare_run_dir(out, {"x": 1}, kind, resume=False, overwrite=False):
        for name in ("a.txt", "b.txt"):
            (out / name).write_text("demo: result")
    real_unlink, deleted = Path.unlink, []

    def killed_after_one(path, missing_ok=False):
        if deleted:
            raise SystemExit("kill -9")  # nothing after the first deletion happens
        deleted.append(path.name)
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", killed_after_one)
    with pytest.raises(SystemExit):
        prepare_run_dir(out, {"x": 2}, kind, resume=False, overwrite=True)
    monkeypatch.undo()
    assert deleted == ["a.txt"] and read_record(out, kind) == {"clsp_run": "demo", "x": 1}  # still a run of ours
    with prepare_run_dir(out, {"x": 2}, kind, resume=False, overwrite=True):
        pass
    assert sorted(snapshot(out)) == [LOCK_FILE, "demo.json"] and read_record(out, kind)["x"] == 2


def test_a_fresh_run_that_fails_before_writing_leaves_nothing_but_a_started_one_is_kept(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError), claim(out):
        raise ValueError("a late check failed")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError), claim(out):
        (out / "result.txt").write_text("demo: partial")
        raise ValueError("failed half-way")
    assert (out / "demo.json").exists() and (out / "result.txt").exists()  # kept: resumable


def test_the_lock_names_its_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    with claim(out):
        with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on .*wait for it"):
            claim(out, resume=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_run_dir import claim
        from pathlib import Path
        run = claim(Path({str(out)!r}), resume=True)
        print("held", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid} "):
            claim(out, resume=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # its note is still there...
    with claim(out, resume=True) as run:  # ...but the kernel dropped its lock
        assert run.resumed


def test_write_atomic_that_runs_out_of_room_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "result.json"
    write_atomic(path, "old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # a file-size limit: writes past it fail with EFBIG
    try:
        with pytest.raises(OSError, match="File too large"):
            write_atomic(path, b"x" * 4096)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("made", [False, True])
def test_a_claim_whose_lock_file_a_failing_fresh_run_removed_is_refused(tmp_path, monkeypatch, made):
    """A claim that opened .clsp-lock just before a failing fresh run removed it locked a file without a name: it ran
    beside any later claim, which made a new lock file (or it crashed on the folder the failed run had removed)."""
    out = tmp_path / "new" / "run"
    if not made:
        out.mkdir(parents=True)
    first = claim(out)
    real = fcntl.flock

    def flock(handle, op):  # the second claim has opened .clsp-lock; the first run fails and leaves before it locks
        if handle is not first.lock and op & fcntl.LOCK_EX:
            monkeypatch.setattr(fcntl, "flock", real)
            first.__exit__(ValueError, ValueError("a late check failed"), None)
        return real(handle, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(UserError, match="run the command again"):
        claim(out, resume=True)
    with claim(out, resume=True):  # a claim now holds the lock file every later claim opens
        with pytest.raises(UserError, match="in use by another run"):
            claim(out, resume=True, overwrite=True)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_is_refused_in_words_and_leaves_nothing(tmp_path, monkeypatch, code):
    """flock's ENOLCK or EOPNOTSUPP (some NFS mounts) was a traceback that left the folders the claim made."""
    def flock(handle, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(UserError, match="cannot lock files.*local disk"):
        claim(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


def test_an_overwrite_killed_before_its_new_record_leaves_a_folder_it_can_replace(tmp_path, monkeypatch):
    """kill -9 after --overwrite's deletions, before the new record, in a folder that also holds files not ours
    (`clsp eval`'s eval/ and features/, the user's notes): the same command again replaces the run."""
    out = tmp_path / "run"
    with claim(out):
        (out / "result.txt").write_text("demo: 0.9")
    (out / "notes.txt").write_text("the user's own notes")

    def killed(path, data):
        raise SystemExit("kill -9")

    monkeypatch.setattr(clsp.run_dir, "write_json", killed)
    with pytest.raises(SystemExit):
        claim(out, {**RECORD, "lr": 0.5}, overwrite=True)
    monkeypatch.undo()
    with claim(out, {**RECORD, "lr": 0.5}, overwrite=True):  # was refused: "not made by clsp"
        pass
    assert sorted(snapshot(out)) == [LOCK_FILE, "demo.json", "notes.txt"] and read_record(out, DEMO)["lr"] == 0.5


def test_a_difference_reads_floats_as_written_but_tells_close_ones_apart():
    from clsp.run_dir import record_differences

    assert record_differences({"warmup": 5.0, "w": 0.1}, {"warmup": 0.1 * 3, "w": 0.1 + 1e-15}) == [
        "w: 0.1 there, 0.100000000000001 now", "warmup: 5.0 there, 0.3 now"]  # 0.1 * 3 is 0.30000000000000004
