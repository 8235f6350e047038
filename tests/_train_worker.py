"""Runs `train.loop.train` from a JSON file of TrainConfig options, for tests that need their own process.

    python tests/_train_worker.py OPTIONS.json                       # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_train_worker.py OPTIONS.json
    python tests/_train_worker.py OPTIONS.json --after-step N FAULT   # a fault right after optimizer step N:
        kill         SIGKILL to itself
        term-group   SIGTERM to its whole process group, loader processes included, from another process (start
                     it in a session of its own)
        int-group    SIGINT to its whole process group, as a terminal's Ctrl-C (likewise; start it with SIGINT at
                     its default, as a terminal's job has it)
        kill-loader  SIGKILL to one of its loader processes
    python tests/_train_worker.py OPTIONS.json --record-losses DIR   # each process also writes the losses of its own
                                                                      # anchors, a line a step, to DIR/rank-R.txt

The faults use torch's global optimizer-step hook, so the training code runs unchanged up to them. A UserError is
printed as the CLI prints it (`error: ...`, exit 2).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

torch.set_num_threads(1)  # as in the test process: same kernels, bit-identical results

from clsp.accelerator import leave_process_group  # noqa: E402
from clsp.errors import UserError  # noqa: E402
from clsp.train.loop import make_config, train  # noqa: E402


def fault(name: str) -> None:
    if name == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif name in ("term-group", "int-group"):
        assert os.getpgid(0) == os.getpid(), f"{name} needs a process group of its own (start_new_session=True)"
        # from another process outside the group, as from a scheduler or a terminal: a loader process obeys only its
        # parent's SIGTERM (the DataLoader's way of ending a stuck worker)
        sent = "-TERM" if name == "term-group" else "-INT"
        subprocess.run(["kill", sent, "--", f"-{os.getpid()}"], check=True, start_new_session=True)
    elif name == "kill-loader":
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
    else:
        raise SystemExit(f"unknown fault {name!r}")


def record(folder: Path) -> None:
    """Wraps the epoch's loss function (it still computes and returns the same) to write this process's own loss."""
    from clsp.train import epoch
    from clsp.train.distributed import world_info

    losses = epoch._losses

    def recorded(run, batch):
        out = losses(run, batch)
        with open(folder / f"rank-{world_info()[0]}.txt", "a") as handle:
            handle.write(f"{float(out['loss'].detach())!r}\n")
        return out

    epoch._losses = recorded


def main(argv: list[str]) -> None:
    options = json.loads(Path(argv[0]).read_text())
    if "--after-step" in argv:
        at = argv.index("--after-step")
        step, name, done = int(argv[at + 1]), argv[at + 2], [0]

        def hook(optimizer, args, kwargs) -> None:
            done[0] += 1
            if done[0] == step:
                fault(name)

        register_optimizer_step_post_hook(hook)
    if "--record-losses" in argv:
        record(Path(argv[argv.index("--record-losses") + 1]))
    try:
        train(make_config(**options))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    leave_process_group()  # as a script calling the library under a launcher must (README)


if __name__ == "__main__":
    main(sys.argv[1:])
