"""Process helpers every stage shares: the device a run asks for, one Accelerator per run (also when a process runs
several), an int from the main process on every process, flags OR-ed over processes, SIGTERM and Ctrl-C as a flag,
loader processes that leave stopping to their parent, the cores, memory and torch threads a process may use beside
its loader processes, and status lines from the main process (`say`)."""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from clsp.errors import UserError
from clsp.shards.cores import available_cores  # the stages' one core count (shards/ indexes on it too)

DEVICES = "cpu | cuda | cuda:N | auto"
_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # at import: what torch chose, before anyone set it

def resolve_device(name: str | None) -> torch.device:
    """--device NAME -> torch.device, or UserError naming the fix. None or "auto": cuda when one is visible, else
    cpu. Every command that takes --device checks it here, before anything else happens."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported: use {DEVICES}")
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise UserError(f"--device {name} but no CUDA device is visible: use --device cpu, or leave --device out")
        if device.index is not None and device.index >= visible:
            raise UserError(f"--device {name} but only {visible} CUDA device(s) are visible: use cuda:0..cuda:"
                            f"{visible - 1}")
    return device


def fresh_accelerator(**kwargs) -> Accelerator:
    """Accelerator(**kwargs) with exactly these settings, whatever an earlier run in this process asked for.

    Accelerate keeps its settings in one process-wide state and refuses a second Accelerator with another mixed
    precision ("AcceleratorState has already been initialized"): a GPU run with bf16 followed by one without would
    fail. The per-run part of that state is dropped first; the process group (PartialState) is kept, so this is safe
    under torchrun and `accelerate launch`.
    """
    # No public API resets it; accelerate's own test cases call this between tests.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**kwargs)


def say(procs, text: str) -> None:
    """A status line from the main process only (procs: an Accelerator or PartialState), on stderr, above any progress
    bar: stdout carries a command's result alone (`clsp train run` prints the run folder there, for `RUN=$(...)`)."""
    if procs.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)


def leave_process_group() -> None:
    """Shut this process's part of a launch's process group (torchrun, accelerate launch) down, once its work is done:
    left to the interpreter's exit, gloo's threads could meet a peer's closed connection and abort the process
    ("terminate called without an active exception") after the work was done. The `clsp` command calls it after a
    command succeeds; call it at the end of a script that calls the stages' library entries under a launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast_int(procs, value: int) -> int:
    """The main process's `value` on every process. procs: an Accelerator or PartialState (all processes call this)."""
    from accelerate.utils import broadcast

    if procs.num_processes == 1:
        return value
    return int(broadcast(torch.tensor([value], device=procs.device))[0])


def sum_over_processes(procs, values: torch.Tensor) -> list[float]:
    """(n,) float on each process -> its sum over all processes (all call this), on the host in one copy."""
    from accelerate.utils import reduce

    if procs.num_processes == 1:
        return values.tolist()
    return reduce(values.to(procs.device), reduction="sum").tolist()


def any_process(procs, *flags: bool) -> list[bool]:
    """The flags OR-ed over all processes (all call this), so that every process stops at the same step."""
    return [v > 0 for v in sum_over_processes(procs, torch.tensor([float(f) for f in flags]))]


class StopFlag:
    """Within the block, SIGTERM and a first Ctrl-C only raise a flag (`by` names the signal): the loop checkpoints at
    the end of its step and stops. A second Ctrl-C stops at once (KeyboardInterrupt). Ctrl-C is left alone where
    SIGINT is ignored (a job started with nohup or `&`, a study's pool processes, whose study stops them)."""

    def __init__(self) -> None:
        self.raised, self.by = False, ""  # read after the block too (a study asks whether its run was stopped)

    def __enter__(self) -> "StopFlag":
        self.raised, self.by, self.interrupts, self.previous = False, "", 0, {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
                continue
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: keep the default behaviour
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once)", file=sys.stderr,
                  flush=True)
        self.raised, self.by = True, self.by or ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")

    def __exit__(self, *exc) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def stop_only_when_the_parent_says(worker_id: int, parent: int) -> None:
    """A DataLoader `worker_init_fn` (bind `parent`, the training process's pid, with functools.partial): the loader
    process leaves stopping to the training process. A scheduler's SIGTERM and the terminal's Ctrl-C reach the whole
    process group; a loader process that died of them would end the run with "DataLoader worker ... killed by signal"
    in the middle of a step, before the training process could save its checkpoint (StopFlag). So SIGINT is
    ignored, and a SIGTERM is obeyed only when the parent sent it (the DataLoader's own way of ending a stuck worker)
    or once the parent is gone (an orphan left by kill -9 stays killable); the parent ends its loader processes when
    the run stops.

    Needs a forked, single-threaded worker on Linux (shard_input asks for fork there): a thread that does not block
    SIGTERM would take it. Elsewhere (another start method, another system) the DataLoader's own handling stays."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tasks = Path("/proc/self/task")
    if not hasattr(signal, "sigwaitinfo") or not tasks.is_dir() or len(list(tasks.iterdir())) != 1:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by the thread below, which takes them

    def take_sigterms() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent and os.getppid() == parent:
            pass
        os._exit(0)  # as the DataLoader's own handler does for its parent's SIGTERM

    threading.Thread(target=take_sigterms, name="clsp-sigterm", daemon=True).start()


def stop_loader_processes(batches) -> None:
    """End a DataLoader iterator's loader processes now and stop torch watching them. For the training process once a
    loader process has died: torch's SIGCHLD handler raises "DataLoader worker ... is killed by signal" wherever the
    process is when a child exits next, and where a cut connection told of the death first, that was in the
    iterator's __del__ at exit, a traceback after the run's one error line. Torch's handler is set aside meanwhile
    (in the main thread: elsewhere handlers cannot change), since the other loader processes exit now too. Anything
    but a DataLoader iterator with loader processes (the cached stream, no workers) is left alone."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multiprocessing iterator (a private method)
    if shutdown is None:
        return
    if threading.current_thread() is not threading.main_thread():
        shutdown()
        return
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # SIG_DFL, not SIG_IGN: children stay joinable
    try:
        shutdown()  # joins the loader processes, then forgets their pids: the handler has nothing left to raise about
    finally:
        signal.signal(signal.SIGCHLD, handler)


def processes_here() -> int:
    """Processes of this job on this machine: LOCAL_WORLD_SIZE, which torchrun (and so `accelerate launch`) sets per
    machine (the world size would count other machines' processes too); 1 without it."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def available_memory() -> int | None:
    """Bytes this machine can still give without swapping (/proc/meminfo's MemAvailable), narrowed by the limit of a
    container's cgroup (v2) when it has one; None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as meminfo:
            found += [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def threads_beside_workers(workers: int) -> int | None:
    """Give this process's torch ops the cores its loader processes and its sibling training processes on this machine
    leave free, so that they do not oversubscribe the cores (OpenMP threads that wait on a busy core spin, and a batch
    step then takes 10-20x as long). Siblings: LOCAL_WORLD_SIZE, which torchrun (and so `accelerate launch`) sets per
    machine; the world size would count other machines' processes too. Returns the count set, or None when the user
    chose one (OMP_NUM_THREADS, or torch.set_num_threads)."""
    threads = threads_for_workers(workers)
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


def threads_for_workers(workers: int) -> int | None:
    """The thread count threads_beside_workers would set for `workers` loader processes (None: it would leave the
    user's)."""
    if "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() != _TORCH_DEFAULT_THREADS:
        return None
    return max(1, available_cores() // processes_here() - workers)
