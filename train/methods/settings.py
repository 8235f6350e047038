"""Method settings: what every method has (`MethodConfig`), and the groups that only some have, each declared once.

A method's own config, in its file, combines the groups it uses and sets its defaults:

    @dataclass(frozen=True)
    class MoCoConfig(InfoNCEConfig, QueueConfig, MomentumConfig):
        lam: float = 0.5
        queue_size: int = 32768

Every group subclasses `MethodConfig`, whose `check()` applies the rule (`RULES`) of every field a config has, so a
new setting is a field in its group and a line in `RULES`. The run record holds `asdict` of the method's config: only
the settings that method uses.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from clsp.vocabulary import POSITIVES

# setting -> (is the value valid, what is asked of it):
# `MethodConfig.check` applies the rule of every field a config has
RULES = {
    "lam": (lambda v: v >= 0, "lam (CLSP weight) must be >= 0"),
    "proj_hidden": (lambda v: v >= 1, "proj_hidden must be a positive layer width"),
    "proj_dim": (lambda v: v >= 1, "proj_dim must be a positive layer width"),
    "pred_hidden": (lambda v: v >= 1, "pred_hidden must be a positive layer width"),
    "temperature": (lambda v: v > 0, "temperature must be > 0 (typical 0.1-0.5)"),
    "queue_size": (lambda v: v >= 1, "queue_size must be >= 1 (MoCo: 32768, NNCLR: 65536)"),
}


@dataclass(frozen=True)
class MethodConfig:
    """The settings every method has. Build a method's own with ``MethodConfig.for_method(name, **settings)``."""

    positives: str = "synthetic"
    lam: float = 1.0  # weight of the CLSP term
    proj_hidden: int = 4096
    proj_dim: int = 256
    proj_bn: bool = False  # BatchNorm1d in the projector's hidden layer

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first setting with a bad value."""
        if self.positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}, got {self.positives!r}")
        for setting in fields(self):
            valid, asked = RULES.get(setting.name, (lambda v: True, ""))
            if not valid(getattr(self, setting.name)):
                raise ValueError(f"{asked}, got {getattr(self, setting.name)!r}")
        base, final = getattr(self, "momentum_base", 0.0), getattr(self, "momentum_final", 1.0)
        if not 0.0 <= base <= final <= 1.0:
            raise ValueError(f"momentum must satisfy 0 <= momentum_base <= momentum_final <= 1, got base={base}, "
                             f"final={final}")

    @classmethod
    def for_method(cls, name: str, **settings) -> "MethodConfig":
        """Method `name`'s config: its defaults with `settings` on top; a setting that is None keeps the default, one
        the method does not have is refused."""
        from clsp.train.methods import method_class, setting_names  # the registry imports this module

        known = setting_names(name)
        unknown = sorted(key for key, value in settings.items() if value is not None and key not in known)
        if unknown:
            raise ValueError(f"{name} has no setting {', '.join(unknown)}: its settings are {', '.join(sorted(known))}")
        return method_class(name).config(**{key: value for key, value in settings.items() if value is not None})


@dataclass(frozen=True)
class InfoNCEConfig(MethodConfig):
    """Methods with an InfoNCE loss (SimCLR, MoCo, NNCLR)."""

    temperature: float = 0.2


@dataclass(frozen=True)
class QueueConfig(MethodConfig):
    """Methods that keep projections of past batches: MoCo's negatives, NNCLR's support set."""

    queue_size: int = 65536


@dataclass(frozen=True)
class PredictorConfig(MethodConfig):
    """Methods with a predictor head on the projection (BYOL, NNCLR)."""

    pred_hidden: int = 4096  # predictor hidden width


@dataclass(frozen=True)
class MomentumConfig(MethodConfig):
    """Methods with momentum (target) encoders (MoCo, BYOL): the momentum rises on a cosine from base to final."""

    momentum_base: float = 0.99  # at progress 0 ...
    momentum_final: float = 0.999  # ... at progress 1
