"""--log-with: the Accelerate tracker that also gets log.csv's scalars."""
from __future__ import annotations

from clsp.errors import UserError


def tracker_options(log_with: str | None, out: str) -> dict:
    """Accelerator options for --log-with, checked before anything runs: a tracker Accelerate knows whose package is
    installed (tensorboard: `pip install 'clsp-positives[tensorboard]'`)."""
    if not log_with:
        return {}
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import ProjectConfiguration

    if log_with not in LOGGER_TYPE_TO_CLASS:
        raise UserError(f"--log-with {log_with!r} is not a tracker Accelerate supports: use one of "
                        f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    import accelerate.utils as available

    check = getattr(available, f"is_{log_with}_available", None)
    if check is not None and not check():
        extra = " (pip install 'clsp-positives[tensorboard]')" if log_with == "tensorboard" else ""
        raise UserError(f"--log-with {log_with} needs its package, which is not installed: install it{extra}, or leave "
                        "--log-with out (log.csv is always written)")
    return {"log_with": log_with, "project_config": ProjectConfiguration(project_dir=out, logging_dir=out)}
