"""Output folders of every stage (generator, synth, train): one rule for refusing, resuming and overwriting them.

A folder is a run of ours when it holds the stage's record file (train_config.json, run.json, config.json) whose JSON
names its kind, {"clsp_run": "synth", ...}: recognised by content, not by name. `prepare_run_dir(out, record, kind,
resume, overwrite)`:
  - refuses --out at or under a regular file, and a non-empty folder that holds no record of ours (nothing changes);
  - takes an exclusive lock: flock on OUT/.clsp-lock, whose text names pid, host and command. The kernel drops the
    lock when its process dies, so a killed run never leaves a stale lock behind; a forked child (a DataLoader
    worker) closes its inherited copy at once, so a lock never outlives its own process in a child;
  - compares the record with the folder's: identity fields must match to go on (operational fields may differ), and
    an existing run goes on only with `resume` (synth always resumes);
  - with `overwrite`, deletes only the files the stage recognises as its own (name pattern AND content), in the
    order `kind.owned` gives (markers such as "finished" first) and never the record, which the new one replaces;
    either way removes the temp files (.NAME.tmp-PID) of its own that a killed writer left;
  - writes the record atomically, and returns a RunDir that holds the lock until it is left (`with`).
Validate everything before calling it: a refused command must leave nothing behind. A fresh folder whose run fails
while it holds nothing but the record is removed again on the way out of the `with`.

Writing files atomically is clsp/file_io.py's (`write_atomic`), recognising a stage's own files by content
clsp/file_checks.py's (`owned_files`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from weakref import WeakSet

from clsp.errors import UserError
from clsp.file_checks import SMALL_JSON, is_temp_of, json_with, left_by_a_killed_writer, linked_folders, \
    small_json
from clsp.file_io import write_json
from clsp.shards.manifest_checks import MANIFEST

MARKER = "clsp_run"  # record key naming the kind of run: what marks a folder as ours
LOCK_FILE = ".clsp-lock"
_HELD: WeakSet[IO] = WeakSet()  # this process's lock handles (lock_folder)


class NoLocks(UserError):
    """The file system of --out cannot lock files (flock: ENOLCK, EOPNOTSUPP)."""


def _drop_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock handles. An flock belongs to the open file, which a
    fork shares, so a DataLoader worker that outlives a kill -9 of its parent (it notices within seconds) would keep
    the folder locked. Closing, not unlocking: LOCK_UN here would release the parent's lock too."""
    for handle in list(_HELD):
        handle.close()
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


# --- removing a stage's own files (--overwrite) --------------------------------------------------------------------
def remove_files(out: Path, paths: list[Path]) -> None:
    """Delete these files, then the folders under `out` that this left empty (deepest first)."""
    for path in paths:
        path.unlink(missing_ok=True)
    folders = {folder for p in paths for folder in p.parents if out in folder.parents}  # strictly inside `out`
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        try:
            folder.rmdir()
        except OSError:  # not empty: it holds something that is not ours
            pass


# --- the kinds of run folder ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunKind:
    """What one stage's output folder is, for `prepare_run_dir`."""

    name: str  # "generator" | "synth" | "train": the record's MARKER value
    record_file: str  # the record's file name in the folder
    command: str  # the command that makes such a folder, for messages
    owned: Callable[[Path], list[Path]]  # the stage's own files in a folder (owned_files): what --overwrite deletes
    describe: Callable[[Path], str]  # "a finished generator", "an unfinished run (checkpoint at step 400)"
    operational: tuple[str, ...] = ()  # dotted record keys that may differ between a run and its resume
    legacy_keys: tuple[str, ...] = ()  # keys that recognise a record written before records carried MARKER
    # dotted key -> the value a record written before that key existed was made with (e.g. the generator of noise)
    absent_means: dict = field(default_factory=dict)
    upgrade: Callable[[dict], dict] | None = None  # rewrites a record an older clsp wrote into today's form
    # dotted key -> the fix to name when it differs, where passing the same options cannot continue the run
    hints: dict = field(default_factory=dict)


def read_record(out: str | Path, kind: RunKind) -> dict | None:
    """The folder's record when it holds a `kind` run of ours (recognised by content), else None. Keys added since the
    record was written read as `kind.absent_means` says, so a resume compares like with like."""
    data = small_json(Path(out) / kind.record_file)
    if not isinstance(data, dict):
        return None
    if data.get(MARKER) != kind.name:
        if not (MARKER not in data and kind.legacy_keys and all(k in data for k in kind.legacy_keys)):
            return None
        data = {MARKER: kind.name, **data}  # made by a clsp that did not mark its records yet
    for dotted, value in kind.absent_means.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return kind.upgrade(data) if kind.upgrade else data


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _leaves(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def record_differences(old: dict, new: dict, operational: tuple[str, ...] = ()) -> list[str]:
    """'key: OLD there, NEW now' for every dotted leaf that differs, skipping operational keys (and their children)."""
    a, b = _leaves(old), _leaves(new)
    skip = lambda key: any(key == o or key.startswith(o + ".") for o in operational)  # noqa: E731
    return [f"{key}: {' there, '.join(_shown(a.get(key, _ABSENT), b.get(key, _ABSENT)))} now"
            for key in sorted(set(a) | set(b)) if not skip(key) and a.get(key, _ABSENT) != b.get(key, _ABSENT)]


def _shown(old, new) -> tuple[str, str]:
    """repr of two differing values, floats to 12 digits where that still tells them apart (0.1 * 3 reads 0.3)."""
    short = tuple(repr(round(v, 12)) if isinstance(v, float) else repr(v) for v in (old, new))
    return short if short[0] != short[1] else (repr(old), repr(new))


def difference_fixes(kind: RunKind, differences: list[str], options_fix: str) -> str:
    """The fixes for `differences` (record_differences): `options_fix` when a difference has no hint (an option
    differs), then the kind's hints for the keys they name (fixes no option gives), each once."""
    hinted = [d for d in differences if any(d.startswith(f"{key}:") for key in kind.hints)]
    named = (kind.hints[key] for key in kind.hints if any(d.startswith(f"{key}:") for d in hinted))
    return "; ".join(([] if len(hinted) == len(differences) else [options_fix]) + list(dict.fromkeys(named)))


# --- claiming a folder ----------------------------------------------------------------------------------------------
@dataclass
class RunDir:
    """A claimed output folder: `resumed` when a run of ours with the same identity goes on in it."""

    out: Path
    kind: RunKind
    resumed: bool
    lock: IO | None = None  # held by the main process only
    made: tuple[Path, ...] = ()  # folders the claim created, deepest first

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.resumed:
            self._remove_if_only_the_record()
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
            self.lock = None

    def _remove_if_only_the_record(self) -> None:
        """A fresh run that failed before writing anything but its record leaves nothing behind."""
        if self.lock is None or not self.out.is_dir():
            return
        if {p.name for p in self.out.iterdir()} <= {self.kind.record_file, LOCK_FILE}:
            (self.out / self.kind.record_file).unlink(missing_ok=True)
            (self.out / LOCK_FILE).unlink(missing_ok=True)  # safe: lock_folder checks it locked the file on disk
            remove_made(self.made)


def remove_made(made: tuple[Path, ...]) -> None:
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break


def prepare_run_dir(out: str | Path, record: dict, kind: RunKind, resume: bool, overwrite: bool,
                    procs=None) -> RunDir:
    """Claim `out` for a `kind` run described by `record` (see the module doc); UserError when it must not be used.

    procs (an Accelerator or PartialState; all processes call this): the main process claims the folder, the others
    wait and get its verdict. Use the result in a `with` block that spans the run: it holds the lock.
    """
    out, record = Path(out), {MARKER: kind.name, **record}
    if procs is None or procs.num_processes == 1:
        return _claim(out, record, kind, resume, overwrite)
    from clsp.accelerator import broadcast_int

    if procs.is_main_process:
        try:
            run = _claim(out, record, kind, resume, overwrite)
        except BaseException:
            broadcast_int(procs, -1)
            raise
        broadcast_int(procs, int(run.resumed))
        return run
    status = broadcast_int(procs, 0)
    if status < 0:
        raise UserError(f"the main process refused --out {out}: see its error message")
    return RunDir(out, kind, resumed=bool(status))


def _claim(out: Path, record: dict, kind: RunKind, resume: bool, overwrite: bool) -> RunDir:
    check_out_path(out)
    _check_folder(out, record, kind, resume, overwrite)  # read only: a refusal changes nothing
    made = tuple(p for p in (out, *out.parents) if not p.exists())
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_folder(out, kind.name)
    except NoLocks:  # nobody can hold a lock here: what this claim made goes again
        if made:
            (out / LOCK_FILE).unlink(missing_ok=True)
        remove_made(made)
        raise
    run = RunDir(out, kind, resumed=False, lock=lock, made=made)
    try:
        old = _check_folder(out, record, kind, resume, overwrite)  # again under the lock: another run may have ended
        if old is not None and overwrite:  # the record stays until the new one replaces it (atomically, below):
            record_file = out / kind.record_file  # killed anywhere between, the folder is still a run of ours, also
            remove_files(out, [p for p in kind.owned(out) if p != record_file])  # beside files not ours (eval/)
        remove_files(out, _cut_writes(out, kind))
        run.resumed = old is not None and not overwrite
        write_json(out / kind.record_file, record)
    except BaseException:
        run.__exit__(*sys.exc_info())
        raise
    return run


def _cut_writes(out: Path, kind: RunKind) -> list[Path]:
    """The temp files (.NAME.tmp-PID) of the kind's writes that a kill cut short (the record's, a checkpoint's, a
    log's): named so, recognised by the kind, and their writer gone (a command that writes into the folder without
    claiming it, such as `clsp diffusion eval` into a generator's card, may be at work)."""
    named = [p for p in out.rglob(".*.tmp-*") if left_by_a_killed_writer(p)]
    if not named:  # the usual case: no content check of the kind's files
        return []
    ours = set(kind.owned(out)) | {p for p in named if p.parent == out and is_temp_of(kind.record_file)(p)}
    return sorted(p for p in named if p in ours)


def check_out_path(out: str | Path) -> None:
    """An --out that is a file, or lies under one, refused (UserError) before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory (a new one, or one this command made)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out} lies under {parent}, which is a file: give a directory elsewhere")
            return


def check_usable(out: str | Path, kind: RunKind) -> None:
    """Read only: UserError when `out` can hold no `kind` run (a file, a folder not ours, links to folders), for a
    command that claims many folders later and checks them all first."""
    check_out_path(out)
    why = _not_ours(Path(out), kind)
    if why:
        raise UserError(why)


def _check_folder(out: Path, record: dict, kind: RunKind, resume: bool, overwrite: bool) -> dict | None:
    """The folder's record when a run of ours is there (None: the folder is new or empty); UserError when the run
    must not go on in it."""
    why = _not_ours(out, kind)
    if why:
        raise UserError(why)
    old = read_record(out, kind)
    if old is None or overwrite:
        return old
    differences = record_differences(old, record, kind.operational)
    if differences:
        fixes = difference_fixes(kind, differences, "pass the same options to continue it")
        raise UserError(f"--out {out} holds a {kind.name} run made with another config ({'; '.join(differences)}): "
                        f"{fixes}, another --out, or --overwrite to replace it")
    if not resume:
        raise UserError(f"--out {out} already holds {kind.describe(out)} with these settings: pass --resume to "
                        f"continue it (a finished run is left as it is), or --overwrite to start again")
    return old


def _not_ours(out: Path, kind: RunKind) -> str | None:
    """Why `out` must not be used for a `kind` run, or None (new, empty, or a `kind` run of ours)."""
    if not out.is_dir():
        return None
    entries = [p for p in out.iterdir() if not (p.name == LOCK_FILE and _is_lock(p))
               and not is_temp_of(kind.record_file)(p)]  # a fresh claim killed while writing its record
    if not entries:
        return None
    if read_record(out, kind) is not None:  # a run of ours: only then are links worth a walk (a stranger's folder is
        links = linked_folders(out)  # refused below whatever it holds, and may be a whole home directory)
        if not links:  # else its writes and --overwrite's deletions would go through them
            return None
        shown = ", ".join(f"{p.relative_to(out)} -> {os.readlink(p)}" for p in links[:3])
        return (f"--out {out} holds {len(links)} link(s) to folders ({shown}); clsp writes and deletes only inside "
                f"its --out, never through a link: remove the link(s) (copy what they lead to, if it belongs there) "
                f"or choose another --out; nothing in it was changed")
    other = run_here(out)
    if other:
        return f"--out {out} holds a clsp {other[0]} run ({other[1]}), not a {kind.name} run: choose another --out"
    return (f"--out {out} is not empty and was not made by `{kind.command}` (it holds no {kind.record_file} of "
            f"ours): choose a new or empty directory; nothing in it was changed")


def run_here(out: Path) -> tuple[str, str] | None:
    """(kind, record file name) of the clsp run whose record lies in `out` (generator, synth or train), else None."""
    for path in sorted(out.glob("*.json")) if out.is_dir() else ():
        record = small_json(path)
        if isinstance(record, dict) and isinstance(record.get(MARKER), str):
            return record[MARKER], path.name
    return None


def stage_output(out: Path) -> str | None:
    """What another stage made in `out`, in words: a clsp run (its record), or shards (made here or elsewhere: their
    manifest); None when neither. For commands that write beside no stage's files (eval's reports, the study)."""
    record = run_here(out)
    if record:
        return f"a clsp {record[0]} run ({record[1]})"
    return f"shards ({MANIFEST})" if (out / MANIFEST).exists() else None


def _is_lock(path: Path) -> bool:
    return path.is_file() and (path.stat().st_size == 0 or json_with("clsp_lock")(path))


def lock_folder(out: Path, kind: str) -> IO:
    """Exclusive lock on the folder (flock on OUT/.clsp-lock, naming this process and `kind`), or UserError naming who
    holds it. Held until the returned handle is closed, or its process ends."""
    path = out / LOCK_FILE
    try:
        handle = open(path, "a+")
    except FileNotFoundError:  # a fresh run that failed removed the folder it made as this claim began
        raise UserError(f"--out {out} was removed by a run that failed as this one started: run the command again") \
            from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read(SMALL_JSON))
        except ValueError:
            holder = {}
        handle.close()
        raise UserError(f"--out {out} is in use by another run (pid {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')} since {holder.get('started', '?')}: {holder.get('command', '?')}):"
                        f" wait for it to finish or stop it, or choose another --out") from None
    except OSError as error:  # ENOLCK, EOPNOTSUPP: a file system without working locks (some NFS mounts)
        handle.close()
        raise NoLocks(f"--out {out} is on a file system that cannot lock files ({error.strerror}); clsp locks its "
                      f"output folder so that two runs never share it: choose an --out on a local disk, or one whose "
                      f"file system supports locks (NFS: a running lock manager, or mount with local_lock=flock)") \
            from None
    try:
        same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:  # a fresh run that failed removed this lock file after it was opened here: this lock guards nothing
        handle.close()
        raise UserError(f"--out {out} was released by a run that failed as this one started: run the command again")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"clsp_lock": kind, "pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(sys.argv)}) + "\n")
    handle.flush()
    _HELD.add(handle)
    return handle
