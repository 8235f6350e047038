"""The study: can CLSP be told from its baseline and from the augment control? Orchestrates the stages, holds no
training or scoring logic of its own.

For every (method, positives, seed) it trains a run on one set of shards (train.loop.train, under
`<out>/runs/<method>-<positives>-seed<seed>/`), scores it over every labelled image of the source by k-fold
(eval.kfold: features once, kNN bank and linear probe fitted on the other folds), then writes one report of paired
differences against the baseline with 95 % intervals (eval.report.write_report, eval.paired).

Everything is checked before the first run trains: the source against the shards' record, the labels, every run's
training config, and every run already in `<out>/runs/` against the config this study would train it with (another
one is refused: its scores would be reported as this study's). Resumable: a run whose current weights were scored with
the same scoring is skipped; a finished training run is not trained again; an unfinished one resumes from its
checkpoint, with a note when it goes on on another thread count than it began on (`<out>/train-threads.json`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from clsp.accelerator import available_cores
from clsp.errors import StoppedBySignal, UserError
from clsp.eval.evaluate import EvalConfig
from clsp.run_dir import lock_folder


@dataclass(frozen=True)
class StudyConfig:
    shards: str
    source: str | None  # labelled source spec; None: the one the shards were made from
    out: str
    methods: tuple[str, ...] = ("simclr",)  # ("simclr", "moco") doubles the time
    positives: tuple[str, ...] = ("none", "augment", "synthetic")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    folds: int = 5
    train_preset: str | None = "embedded"
    train_options: tuple[tuple[str, object], ...] = ()  # extra TrainConfig options, e.g. (("epochs", 5),)
    jobs: int = 1  # runs trained at once, each in its own process on cores // jobs threads
    eval: EvalConfig = field(default_factory=EvalConfig)  # probe, kNN ks, batch size, device

    def __post_init__(self) -> None:
        if not (self.methods and self.positives and self.seeds):
            raise ValueError("a study needs at least one method, one kind of positives and one seed")
        for name in ("methods", "positives", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"--{name} lists {sorted(values, key=str)}: give each once (a repeated run would "
                                 f"count twice in the mean)")
        if self.folds < 2:
            raise ValueError(f"--folds must be >= 2, got {self.folds}")
        if self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")


def run_dir(cfg: StudyConfig, method: str, positives: str, seed: int) -> Path:
    return Path(cfg.out) / "runs" / f"{method}-{positives}-seed{seed}"


def plan(cfg: StudyConfig) -> list:
    """Every run's TrainConfig, built (so validated) before the first one trains: a typo costs seconds, not hours."""
    from clsp.train.loop import make_config

    own = sorted(set(dict(cfg.train_options)) & {"shards", "out", "method", "positives", "seed", "resume", "overwrite"})
    if own:  # the study sets these per run: a --train-option value would be overridden without a word
        raise UserError(f"--train-option {', '.join(own)}: the study sets these itself; use --methods, --positives, "
                        f"--seeds and --out (or the positional SHARDS) instead")
    try:
        return [make_config(cfg.train_preset, **{**dict(cfg.train_options), "shards": cfg.shards,
                                                 "out": str(run_dir(cfg, method, positives, seed)), "method": method,
                                                 "positives": positives, "seed": seed, "resume": True})
                for method in cfg.methods for positives in cfg.positives for seed in cfg.seeds]
    except TypeError as error:  # make_config: an option TrainConfig does not have
        raise UserError(f"{error}: --train-option takes `clsp train run` options, e.g. epochs=20") from None


def check_trained_as_planned(runs: list, manifest) -> None:
    """Refuse a run folder whose config.json records another training than `runs` (TrainConfigs) plan for it, e.g. other
    --train-option values: by train's own comparison (record_differences, train's operational keys) of the options,
    the shards (source, generator, bytes), a streamed run's loader processes and the augmentation (recipe, draws), so
    a study never reports a run trained otherwise as one of its own, nor trains for hours before train refuses to
    resume one."""
    from clsp.run_dir import check_usable, difference_fixes, read_record, record_differences
    from clsp.train.augment import AUGMENT_DRAWS, recipe_for
    from clsp.train.cache import use_cache
    from clsp.train.loop import TRAIN_RUN, TrainConfig, recorded_generator, shards_sha256, stream_plan, stream_workers

    unset = {f.name: f.default for f in fields(TrainConfig)}  # config.json leaves out options that were left unset
    made_from = {"source": manifest.run.get("source"), "generator": recorded_generator(manifest),
                 "shards_sha256": shards_sha256(manifest)}  # the same source and generator may have made other shards
    for run in runs:
        check_usable(run.out, TRAIN_RUN)  # a folder not made by train: refused now, not when its turn comes
        old = read_record(run.out, TRAIN_RUN)
        if old is None:
            continue
        # config.json holds `cache` only when the run trained from memory (which reads the anchors in another order)
        cached = use_cache(run.cache, manifest.count, manifest.k, int(manifest.run["image_size"]), run.positives, 1)
        # a streamed run's order depends on its loader processes and how its batches are split over them (train's
        # data.stream_workers and data.stream_plan; None: from memory, or split as clsp 0.3.0 split them)
        data = {**made_from, "stream_workers": None if cached else stream_workers(run.workers),
                "stream_plan": None if cached else stream_plan(run, manifest, 1)}
        planned = {"config": {**asdict(run), "cache": cached}, "data": data, "augment": recipe_for(run.method),
                   "augment_draws": AUGMENT_DRAWS}
        recorded = {"config": {**unset, "cache": False, **old.get("config", {})},
                    "data": {key: old.get("data", {}).get(key) for key in data}, "augment": old.get("augment"),
                    "augment_draws": old.get("augment_draws")}  # None: kornia's modules (clsp <= 0.3.0)
        differences = record_differences(recorded, planned, TRAIN_RUN.operational)
        if differences:
            fix = difference_fixes(TRAIN_RUN, differences, "rerun with the options the study was begun with")
            raise UserError(f"{run.out} was trained otherwise than this study would train it ({'; '.join(differences)})"
                            f": its scores are not this study's; {fix}, or pass another --out")


def study(cfg: StudyConfig) -> dict:
    """Train, score (k-fold over every labelled image) and report every (method, positives, seed); returns the report
    summary (eval.report.write_report)."""
    from clsp.sources import open_source
    from clsp.eval.kfold import assign_folds, evaluate_run_kfold, load_kfold, load_labelled, scoring_key
    from clsp.eval.evaluate import check_trained_on
    from clsp.eval.report import write_report
    from clsp.shards.manifest import read_manifest
    from clsp.train.shard_input import check_present

    manifest = read_manifest(cfg.shards)  # every check here comes before hours of training, not after
    check_present(manifest, cfg.shards)
    made_from = manifest.run
    spec = cfg.source or made_from["source"]["spec"]
    shard_size = int(made_from["image_size"])
    bank = open_source(spec, cfg.eval.train_split, image_size=shard_size)  # the train split: the runs' own data
    check_trained_on(cfg.shards, {**made_from["source"], "image_size": shard_size}, bank, cfg.eval.transfer)
    runs = plan(cfg)
    check_trained_as_planned(runs, manifest)
    data = load_labelled(spec, runs[0].image_size or shard_size)  # every labelled image, loaded once
    assign_folds(data.ids, cfg.folds)  # more folds than images: refused now, not after the first run has trained
    scoring = scoring_key(data, cfg.folds, cfg.eval)
    eval_config = replace(cfg.eval, source=spec)
    print(f"study: {len(runs)} runs, each scored by {cfg.folds}-fold over the {len(data.ids)} labelled images of "
          f"{spec}")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)  # everything is checked: claim --out for the whole study
    # the lock: a second study here would take runs this one has not begun; stops: one error line, also outside
    # its training's own handlers
    with lock_folder(Path(cfg.out), "study"), _stops_as_errors():
        pending = [run for run in runs if (load_kfold(run.out) or {}).get("scoring") != scoring]
        to_train = [run for run in pending if not _finished(run)]
        note_thread_changes(to_train, {Path(run.out).name: threads_per_run(cfg.jobs, run, manifest)
                                       for run in to_train}, Path(cfg.out))
        if cfg.jobs > 1 and to_train:  # also a single run: in the pool it trains on the threads --jobs gives every run
            train_in_parallel(to_train, cfg.jobs, Path(cfg.out) / "train-logs")
        for run in runs:
            name = Path(run.out).name
            if run not in pending:
                print(f"{name}: trained and scored already, skipped")
                continue
            if not _finished(run):  # trains, or resumes; a finished run (also one the pool trained) is scored
                _train_here(run)
            started = time.perf_counter()
            result = evaluate_run_kfold(run.out, data, bank, eval_config, cfg.folds)
            print(f"{name}: kNN best {result['knn_best']:.2f}%, linear {result['linear_top1']:.2f}% "
                  f"({time.perf_counter() - started:.1f} s to score)")
    # the report lists runs in one order, whatever order --methods, --positives and --seeds were given in: a rerun
    # that only reorders them writes the same files, not a second report
    order = StudyConfig.positives  # every kind, the baseline first, as the study lists them by default
    run_dirs = [Path(run.out) for run in sorted(runs, key=lambda run: (run.method, order.index(run.positives),
                                                                        run.seed))]
    rows = [load_kfold(d) for d in run_dirs]
    scored = (f"{cfg.folds}-fold evaluation over all {len(data.ids)} labelled images of {spec} (each image scored by "
              f"a kNN bank / linear probe fitted on the other folds; folds keyed on image ids, the same for every "
              f"run, so runs are compared image by image; the backbones saw the train split's images, without labels, "
              f"while training)")
    return write_report(rows, run_dirs, cfg.out, scored)


def _finished(run) -> bool:
    from clsp.train.checkpoint import SUMMARY

    return (Path(run.out) / SUMMARY).is_file()


def _train_here(run) -> None:
    """Train (or resume, or find finished) one run in the study's own process. SIGTERM or a first Ctrl-C stops the
    study (UserError: exit status 2, rerun to go on) after the run's step with a checkpoint, or, when it came during the
    run's last step, once that step has finished the run. That run is left unscored: a stop asks to end soon (a
    scheduler kills after a grace period), scoring can take minutes, and the rerun scores it without training again."""
    from clsp.accelerator import StopFlag
    from clsp.train.loop import train

    name = Path(run.out).name
    # handed to train, which enters it around its steps as it would its own: a signal in the run's last step finishes
    # the run and train returns as usual, and only a flag the study holds still says afterwards that one came
    stop_flag = StopFlag()
    try:
        train(run, stop_flag)
    except StoppedBySignal as stopped:  # its message names `clsp train run --resume`, not how to go on
        raise UserError(f"the study was stopped by {stopped.by} while training {name}, whose checkpoint is "
                        f"saved: {STUDY_AGAIN}") from None
    if stop_flag.raised:  # never entered when the run was found finished: no steps to train
        raise UserError(f"the study was stopped by {stop_flag.by} while training {name}, whose last step finished "
                        f"it (it is scored when the study goes on): {STUDY_AGAIN}")


# in --out: the thread count each run was given when it last began from its first step; read only for a run that has
# a checkpoint, which it began on that count. Train's record (compute.threads) holds the count a run last went on with,
# read when the run starts; this file lets the study say a change before any run trains, and serves runs begun before
# train recorded the count
THREADS_RECORD = "train-threads.json"


def threads_per_run(jobs: int, run, manifest) -> int:
    """The torch threads `run` (a TrainConfig) trains on: under --jobs N > 1 in a pool process (pool_threads); under
    --jobs 1 in the study's own process, on its count (OMP_NUM_THREADS, or torch's default), except that a run
    streaming through loader processes on the CPU leaves them their cores when the count is torch's default (as
    train.shard_input does: threads_beside_workers)."""
    import torch

    from clsp.accelerator import threads_for_workers
    from clsp.train.cache import use_cache

    if jobs > 1:
        return pool_threads(jobs)
    streamed = not use_cache(run.cache, manifest.count, manifest.k, int(manifest.run["image_size"]), run.positives, 1)
    if streamed and run.workers and not torch.cuda.is_available():
        return threads_for_workers(run.workers) or torch.get_num_threads()
    return torch.get_num_threads()


def pool_threads(jobs: int) -> int:
    """The threads of each of `jobs` pool processes: the cores this process may use (its CPU affinity: taskset,
    Slurm; not the machine's), shared out."""
    return max(1, available_cores() // jobs)


def note_thread_changes(runs: list, threads: dict[str, int], out: Path) -> None:
    """Record in `out` the thread count (`threads`: run folder name -> count) each of `runs` (TrainConfigs to train)
    that begins from its first step trains on, and say so when one goes on from its checkpoint on another count
    (another --jobs, other cores): a CPU run's weights depend on its thread count, so that run will not end
    byte-identical to an uninterrupted run on either count. Said, not refused: it is still a sound run of its config,
    and refusing would strand hours of training for want of the same cores."""
    from clsp.file_io import read_json, write_json
    from clsp.train.checkpoint import find_checkpoint

    record = out / THREADS_RECORD
    began = read_json(record) if record.is_file() else {}
    before = dict(began)
    for run in runs:
        name = Path(run.out).name
        now = threads[name]
        if find_checkpoint(Path(run.out)) is None:  # begins from its first step (again)
            began[name] = now
        elif began.get(name, now) != now:  # a run begun before the study kept this record is not compared
            print(f"study: {name} began training on {began[name]} thread(s) and goes on from its checkpoint on "
                  f"{now}: a CPU run's weights depend on its thread count, so they will not be byte-identical to "
                  f"an uninterrupted run's on either count (to keep them, go on with {began[name]} thread(s) per run: "
                  f"the --jobs and cores it began with)")
    if began != before:
        write_json(record, began)


_STOPPING = None  # in a pool process: the study's stop flag (a multiprocessing Event), set when it is being stopped
_TRAINING = False  # in a pool process: whether it holds a run now (else it waits for one on the pool's queue)
_IN_TRAINING = None  # in a pool process: the study's count of its processes that hold a run (a multiprocessing Value)


def _train_on_threads(run, threads: int, log_file: str) -> str | None:
    """One training run in a pool process, on `threads` threads, its progress and warnings written to `log_file`
    (parallel progress bars would interleave on the terminal; errors come back to the study as exceptions). None: not
    started, because the study is stopping."""
    import os
    import sys

    import torch

    from clsp.train.loop import train

    global _TRAINING
    if _STOPPING is not None and _STOPPING.is_set():  # handed over in advance while the study was being stopped
        return None
    _TRAINING = True
    _count_in_training(+1)
    try:
        with open(log_file, "a") as log:
            os.dup2(log.fileno(), 2)  # this process's stderr, Python's and the libraries' alike
            sys.stderr = log
            torch.set_num_threads(threads)
            return Path(train(run)).name
    except Exception as error:
        if _survives_pickling(error):
            raise
        # as itself it would break the pool: a pickling error in place of the run's, or a study hung on its pool
        raise _stand_in(error, Path(run.out).name) from error  # the pool's traceback text shows both
    finally:  # also when the log cannot be opened: the study waits for no run that is not training
        _TRAINING = False
        _count_in_training(-1)


def _count_in_training(change: int) -> None:
    if _IN_TRAINING is not None:
        with _IN_TRAINING.get_lock():
            _IN_TRAINING.value += change


def _survives_pickling(error: Exception) -> bool:
    """Whether `error` comes back to the study as itself: the pool pickles it here and unpickles it there."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # e.g. TypeError: a lock in its attributes, or a required __init__ argument it does not pickle
        return False
    return True


class RunFailed(Exception):
    """What the study gets of a run's error that does not survive pickling: the run, the error's type name, message
    and traceback text."""

    def __init__(self, run: str, kind: str, message: str, trace: str) -> None:
        super().__init__(f"{run} failed: {kind}: {message}")
        self.run, self.kind, self.message, self.trace = run, kind, message, trace

    def __reduce__(self):
        return type(self), (self.run, self.kind, self.message, self.trace)


class RunFailedAsUserError(RunFailed, UserError):
    """RunFailed for a UserError: the CLI still prints its message as one `error:` line, with exit status 2."""

    def __str__(self) -> str:
        return self.message


def _stand_in(error: Exception, run: str) -> RunFailed:
    import traceback

    kind = type(error).__qualname__
    if type(error).__module__ != "builtins":
        kind = f"{type(error).__module__}.{kind}"
    trace = "".join(traceback.format_exception(error))
    return (RunFailedAsUserError if isinstance(error, UserError) else RunFailed)(run, kind, str(error), trace)


def _pool_process_setup(parent: int, stopping, in_training) -> None:
    """The pool processes' initializer. Ctrl-C is the study's to handle: it stops its runs with SIGTERM, which training
    answers with a checkpoint at the end of its step; a run the pool handed over in advance sees `stopping` set and
    does not start. And the process ends when the study is gone (_exit_with_parent)."""
    import signal

    global _STOPPING, _IN_TRAINING
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_only_a_run)
    _STOPPING, _IN_TRAINING = stopping, in_training
    _exit_with_parent(parent)


def _stop_only_a_run(signum, frame) -> None:
    """A pool process's SIGTERM outside training's own handler (StopFlag): it stops a run still setting up, and is
    ignored by a process waiting for work (the study ends those once no run is in training: train_in_parallel)."""
    if _TRAINING:
        raise Stopped


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """End this pool process when the study that started it (pid `parent`) is gone (kill -9, or a SIGTERM that came
    before its handler). An orphan would go on training and hold its run folder's lock, so a rerun would find it "in
    use". Checkpoints are written atomically: exiting mid-step loses at most the steps since the last one."""
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is re-parented (to init or a subreaper)
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


STUDY_AGAIN = "run the same `clsp eval study` command again to go on"


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the study stops as it does on Ctrl-C."""


def _raise_stopped(signum, frame) -> None:
    raise Stopped


@contextmanager
def _stops_as_errors():
    """SIGTERM and Ctrl-C while the study sets up or scores (training has handlers of its own): one `error:` line and
    exit status 2, as a stop in training gives. Nothing is lost: results are written atomically, and the rerun scores
    again a run whose scoring was cut short."""
    import signal
    import threading

    in_main_thread = threading.current_thread() is threading.main_thread()  # the only thread that may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_stopped) if in_main_thread else None
    try:
        yield
    except KeyboardInterrupt as stop:
        raise UserError(f"the study was stopped by {'SIGTERM' if isinstance(stop, Stopped) else 'Ctrl-C'}: "
                        f"{STUDY_AGAIN}") from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def train_in_parallel(runs: list, jobs: int, log_dir: Path) -> None:
    """Train `runs` (TrainConfigs) `jobs` at a time in fresh processes. Two one-thread runs on two cores do about 1.8x
    the work of one two-thread run: a small network's layers do not split well across threads. A run's result does
    not depend on the number of jobs beside it (each is seeded from its config), only on its own thread count.

    A failed run: the runs not started yet are not started, the running ones finish, its error is raised. Ctrl-C or
    SIGTERM: the running ones are stopped too (they resume from their checkpoints on the next run of the study)."""
    import multiprocessing
    import os
    import signal
    import sys
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from clsp.progress import bars_for_a_log

    threads = pool_threads(jobs)
    log_dir.mkdir(parents=True, exist_ok=True)
    bars_for_a_log()  # the pool processes, started below, write their bars into log files (this one's tqdm is loaded)
    print(f"study: training {len(runs)} run(s), {jobs} at a time on {threads} thread(s) each; progress in "
          f"{log_dir}/")

    def stop(signum, frame):
        print("study: SIGTERM: stopping the runs in training (each saves a checkpoint after its step)", file=sys.stderr,
              flush=True)
        raise Stopped

    in_main_thread = threading.current_thread() is threading.main_thread()  # the only thread that may set handlers
    previous = signal.signal(signal.SIGTERM, stop) if in_main_thread else None
    others = set(multiprocessing.active_children())  # started before the pool: not ours to stop
    context = multiprocessing.get_context("spawn")
    stopping, in_training = context.Event(), context.Value("i", 0)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_pool_process_setup,
                               initargs=(os.getpid(), stopping, in_training))

    def terminate_pool() -> None:
        """Stop the runs in training (SIGTERM: each checkpoints after its step), then end the pool's processes. Not
        through the pool: one waiting for work holds its queue's lock, and the pool's own shutdown, interrupted by the
        signal that got us here, may have lost its manager thread; a second Ctrl-C ends them at once."""
        workers = set(multiprocessing.active_children()) - others  # the pool's processes
        for worker in workers:
            worker.terminate()
        try:
            while in_training.value > 0 and any(worker.is_alive() for worker in workers):
                time.sleep(0.1)
        finally:
            for worker in workers:
                worker.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in workers:
                worker.join()

    try:
        futures = [pool.submit(_train_on_threads, run, threads, str(log_dir / f"{Path(run.out).name}.log"))
                   for run in runs]
        for done, future in enumerate(as_completed(futures), 1):
            print(f"{future.result()}: trained ({done}/{len(runs)})", flush=True)
    except Exception as failure:  # a failed run: the others already training finish, no other starts (rerun to go on)
        stopping.set()
        first_line = (str(failure).splitlines() or [type(failure).__name__])[0]
        print(f"study: a run failed ({first_line}); the runs in training finish first, and no other starts (Ctrl-C "
              f"stops them too)", file=sys.stderr, flush=True)
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except BaseException:  # Ctrl-C or SIGTERM while they finish: stop them too, then report the failure
            terminate_pool()
        raise failure
    except BaseException as error:  # Ctrl-C or SIGTERM: stop the runs in training as well, and start no other
        stopping.set()
        terminate_pool()
        if isinstance(error, KeyboardInterrupt):  # as with --jobs 1: one error line, exit status 2
            raise UserError(f"the study was stopped by {'SIGTERM' if isinstance(error, Stopped) else 'Ctrl-C'}, and "
                            f"the runs it was training with it (each goes on from its last checkpoint): "
                            f"{STUDY_AGAIN}") from None
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
