"""Self-supervised methods, one small file each, registered by name; each may add the CLSP term.

    cfg = MethodConfig.for_method("moco", positives="synthetic")   # MoCo's settings (MoCoConfig), its defaults + these
    method = build_method("moco", backbone, feat_dim, cfg)
    out = method([v1, v2], ids, third=v3)   # dict(loss, loss_base, loss_clsp); v*: (B, 3, H, W) augmented
    out["loss"].backward(); optimizer.step(); method.after_step(progress)   # momentum encoders

A method subclass implements ``base_loss`` (the base class builds the projector and ``project``) and names its settings
as ``config``: a MethodConfig subclass declared beside it from the setting groups it uses (methods.settings).
``Method.forward`` adds lam * clsp_term(z1, z3) with z1 the projection of view 1 and z3 that of the third view. The
third view only enters that term: it is never a negative for any anchor.
"""
from __future__ import annotations

import copy
from dataclasses import fields
from typing import Callable, ClassVar

import torch
from torch import nn

from clsp.ema import ema_update
from clsp.train.backbones import mlp_head
from clsp.train.distributed import cosine_momentum
from clsp.train.losses import clsp_term
from clsp.train.methods.settings import (POSITIVES, InfoNCEConfig, MethodConfig, MomentumConfig, PredictorConfig,
                                         QueueConfig)

class Method(nn.Module):
    """Base class: input checks, the CLSP term and the result dict. ``backbone`` is the encoder evaluated later."""

    config: ClassVar[type[MethodConfig]] = MethodConfig  # this method's settings and their defaults
    # What the method's saved state means; a method raises it when that changes (MoCo's queues), and the run record
    # holds it, so a resume across the change is refused naming it rather than failing to load the checkpoint.
    state_layout: ClassVar[int] = 1

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: MethodConfig):
        super().__init__()
        self.backbone, self.feat_dim, self.cfg = backbone, feat_dim, cfg
        self.projector = mlp_head(feat_dim, cfg.proj_hidden, cfg.proj_dim, cfg.proj_bn)

    def add_predictor(self) -> None:
        """The predictor head on the projection (BYOL, NNCLR): Linear-BN-ReLU-Linear, proj_dim -> pred_hidden ->
        proj_dim."""
        self.predictor = mlp_head(self.cfg.proj_dim, self.cfg.pred_hidden, self.cfg.proj_dim, batch_norm=True)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Online projection (B, 3, H, W) -> (B, proj_dim), not normalised."""
        return self.projector(self.backbone(x))

    def base_loss(self, v1: torch.Tensor, v2: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The base method's loss on two views, and z1 = the online projection of v1 (B, proj_dim)."""
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after each optimizer step with progress = step / total_steps in [0, 1]."""

    def forward(self, views: list[torch.Tensor], ids: torch.Tensor, third: torch.Tensor | None = None) -> dict:
        self._check_inputs(views, ids, third)
        loss_base, z1 = self.base_loss(views[0], views[1], ids)
        if third is None:
            loss_clsp = loss_base.new_zeros(())
        else:
            loss_clsp = clsp_term(z1, self.project(third))
        return {"loss": loss_base + self.cfg.lam * loss_clsp, "loss_base": loss_base, "loss_clsp": loss_clsp}

    def _check_inputs(self, views, ids, third) -> None:
        if len(views) != 2:
            raise ValueError(f"expected views=[v1, v2] (two augmented real views), got {len(views)} views")
        shape = views[0].shape
        if views[0].ndim != 4 or views[1].shape != shape:
            shapes = [tuple(v.shape) for v in views]
            raise ValueError(f"views must be two (B, 3, H, W) tensors of one shape, got {shapes}")
        if ids.shape != (shape[0],):
            raise ValueError(f"ids must have shape (B,) = ({shape[0]},), got {tuple(ids.shape)}")
        if self.cfg.positives == "none" and third is not None:
            raise ValueError("positives='none' takes no third view: pass third=None or use synthetic/augment")
        if self.cfg.positives != "none" and third is None:
            raise ValueError(f"positives={self.cfg.positives!r} needs the third view: pass third=(B, 3, H, W)")
        if third is not None and third.shape != shape:
            raise ValueError(f"third view must have the views' shape {tuple(shape)}, got {tuple(third.shape)}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: the momentum (target) twin of an online network."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


class MomentumMethod(Method):
    """A method with momentum (target) twins of the backbone and projector (MoCo, BYOL). A subclass calls
    ``add_targets()`` at the end of its ``__init__``; after each step the twins move towards the online networks."""

    def add_targets(self) -> None:
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)

    @torch.no_grad()
    def target_project(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))  # (B, p), no gradient

    def after_step(self, progress: float) -> None:
        m = cosine_momentum(self.cfg.momentum_base, self.cfg.momentum_final, progress)
        ema_update(self.target_backbone, self.backbone, m, lerp=False)  # mul + add: the form these runs trained with
        ema_update(self.target_projector, self.projector, m, lerp=False)


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a Method available to ``build_method(name, ...)``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered (by {_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}: choose one of {method_names()}")
    return _REGISTRY[name]


def setting_names(name: str) -> set[str]:
    """The settings method `name` has (its config's fields)."""
    return {f.name for f in fields(method_class(name).config)}


def build_method(name: str, backbone: nn.Module, feat_dim: int, cfg: MethodConfig | None = None) -> Method:
    """Wrap ``backbone`` ((B, 3, H, W) -> (B, feat_dim)) in method ``name``; cfg defaults to the method's defaults."""
    cls = method_class(name)
    cfg = cls.config() if cfg is None else cfg
    if type(cfg) is not cls.config:  # exactly: a MoCoConfig is an InfoNCEConfig too, but not SimCLR's settings
        raise TypeError(f"{name} takes settings of type {cls.config.__name__} (MethodConfig.for_method({name!r}, "
                        f"...)), got {type(cfg).__name__}")
    return cls(backbone, feat_dim, cfg)


# The built-in methods register themselves on import (kept last: they import the names above).
from clsp.train.methods import byol, moco, nnclr, simclr  # noqa: E402,F401

__all__ = ["Method", "MomentumMethod", "MethodConfig", "InfoNCEConfig", "QueueConfig", "PredictorConfig",
           "MomentumConfig", "POSITIVES", "build_method", "method_class", "method_names", "register", "setting_names"]
