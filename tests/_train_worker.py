"""Runs `train.loop.train` from a JSON file of TrainConfig options, for tests that need their own process.

    python tests/_train_worker.py OPTIONS.json                       # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_train_worker.py OPTIONS.json
    python tests/_train_worker.py OPTIONS.json --kill-after-step N   # SIGKILL itself right after optimizer step N

The kill uses torch's global optimizer-step hook, so the training code runs unchanged up to the kill.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

torch.set_num_threads(1)  # as in the test process: same kernels, bit-identical results

from clsp.train.loop import make_config, train  # noqa: E402


def main(argv: list[str]) -> None:
    options = json.loads(Path(argv[0]).read_text())
    if "--kill-after-step" in argv:
        kill_at, done = int(argv[argv.index("--kill-after-step") + 1]), [0]

        def kill(optimizer, args, kwargs) -> None:
            done[0] += 1
            if done[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        register_optimizer_step_post_hook(kill)
    train(make_config(**options))


if __name__ == "__main__":
    main(sys.argv[1:])
