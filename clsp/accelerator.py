"""One Accelerator per run, also when a process runs several (eval study, a test suite, a notebook)."""
from __future__ import annotations

from accelerate import Accelerator
from accelerate.state import AcceleratorState


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
