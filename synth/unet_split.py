"""Split a diffusers UNet2DModel into an encoder and a decoder around its bottleneck.

The CLSP sampler mixes the bottleneck of the sample with the bottleneck of the noised anchor, then decodes once with
the sample's skip tensors. This module runs the same sub-modules, in the same order and with the same arguments, as
`UNet2DModel.forward` (diffusers 0.3x-0.4x), cut after the mid block:

    encode:  time embedding -> conv_in -> down blocks (collecting skips) -> mid block      -> h, skips
    decode:  up blocks (consuming skips) -> norm -> act -> conv_out (+ skip branch, fourier scaling)

so that `decode(unet, *encode(unet, x, t), embed_time(...))` equals `unet(x, t).sample`. Every down/up block type that
UNet2DModel can build is called exactly as UNet2DModel calls it, including the `Skip*` blocks (their image-space skip
branch lives inside the encoder or inside the decoder, never across the cut).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

Skips = tuple[torch.Tensor, ...]


def check_supported(unet: torch.nn.Module) -> None:
    """Raise a clear error for models whose forward this split does not reproduce."""
    if not isinstance(unet, UNet2DModel):
        raise TypeError(
            f"the CLSP sampler needs a diffusers UNet2DModel (unconditional, noise prediction); got "
            f"{type(unet).__name__}. Fix: load the generator with synth.models.load_generator or build a UNet2DModel."
        )


def timestep_tensor(unet: UNet2DModel, t: torch.Tensor | int | float, batch: int) -> torch.Tensor:
    """Broadcast a timestep (scalar or (B,)) to a (batch,) tensor on the unet's device, as UNet2DModel.forward does."""
    device = unet.conv_in.weight.device
    if not torch.is_tensor(t):  # filled on the device: torch.tensor([t], device=...) is a copy that waits for the GPU
        return torch.full((batch,), t, dtype=torch.long, device=device)  # (batch,)
    if t.ndim == 0:
        t = t[None].to(device)
    t = t.to(device)
    return t * torch.ones(batch, dtype=t.dtype, device=device)  # (batch,)


def embed_time(
    unet: UNet2DModel,
    t: torch.Tensor | int | float,
    batch: int,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Time (+ class) embedding for `batch` rows -> (batch, D)."""
    check_supported(unet)
    timesteps = timestep_tensor(unet, t, batch)  # (B,)
    t_emb = unet.time_proj(timesteps).to(dtype=unet.dtype)  # time_proj returns fp32; the embedding may be fp16/bf16
    time_embedding = getattr(unet, "time_embedding", None)
    emb = time_embedding(t_emb) if time_embedding is not None else t_emb  # (B, D)
    class_embedding = getattr(unet, "class_embedding", None)
    if class_embedding is not None:
        if class_labels is None:
            raise ValueError("this UNet is class-conditional: pass class_labels (B,) to encode/embed_time")
        if unet.config.class_embed_type == "timestep":
            class_labels = unet.time_proj(class_labels)
        emb = emb + class_embedding(class_labels).to(dtype=unet.dtype)
    elif class_labels is not None:
        raise ValueError("class_labels given but this UNet has no class embedding: drop class_labels")
    return emb


def encode(
    unet: UNet2DModel,
    x: torch.Tensor,
    t: torch.Tensor | int | float,
    temb: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Skips]:
    """Encoder half: x (B, C, H, W) at timestep t -> (h (B, C', H', W') bottleneck, skips).

    `temb` (B, D) may be passed when the caller already computed it with `embed_time` (the sampler shares one
    embedding between encoder and decoder).
    """
    check_supported(unet)
    if temb is None:
        temb = embed_time(unet, t, x.shape[0], class_labels)
    if unet.config.center_input_sample:
        x = 2 * x - 1.0
    skip_sample = x  # image-space branch of Skip* down blocks; it never crosses the bottleneck
    h = unet.conv_in(x)  # (B, C0, H, W)
    skips: Skips = (h,)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            h, res, skip_sample = block(hidden_states=h, temb=temb, skip_sample=skip_sample)
        else:
            h, res = block(hidden_states=h, temb=temb)
        skips += res
    if unet.mid_block is not None:
        h = unet.mid_block(h, temb)  # (B, C_last, H / 2^(L-1), W / 2^(L-1))
    return h, skips


def decode(
    unet: UNet2DModel,
    h: torch.Tensor,
    skips: Skips,
    temb: torch.Tensor,
    t: torch.Tensor | int | float | None = None,
) -> torch.Tensor:
    """Decoder half: bottleneck h (B, C', H', W') + skips + temb (B, D) -> model output (B, C_out, H, W).

    `t` is only needed for `time_embedding_type="fourier"` models, whose output is divided by the timestep.
    """
    check_supported(unet)
    skip_sample = None  # image-space branch of Skip* up blocks (UNet2DModel also restarts it here)
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        if hasattr(block, "skip_conv"):
            h, skip_sample = block(h, res, temb, skip_sample)
        else:
            h = block(h, res, temb)
    if skips:
        raise ValueError(f"{len(skips)} skip tensors left after the up blocks: skips do not belong to this UNet")
    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))  # (B, C_out, H, W)
    if skip_sample is not None:
        out = out + skip_sample
    if unet.config.time_embedding_type == "fourier":
        if t is None:
            raise ValueError("this UNet uses a fourier time embedding: pass t to decode (the output is divided by it)")
        timesteps = timestep_tensor(unet, t, out.shape[0])
        out = out / timesteps.reshape(out.shape[0], *([1] * (out.ndim - 1)))
    return out


class SkipDropout(torch.nn.Module):
    """Training-time view of a UNet2DModel whose below-full-resolution skips are replaced in the rows where keep is
    False: by zeros (fill="zero"), or by another row's skips (fill="shuffle": the next row of the batch, another image).

    Those rows must take the image's shape from the bottleneck, so the decoder learns to read it there; with "shuffle"
    it also learns that low-resolution skips can contradict the bottleneck, which is exactly the CLSP sampler's case
    (the anchor's bottleneck, a random trajectory's skips). Full-resolution skips (fine detail, the exact noise to
    predict) always pass. Nothing changes at sampling time: the weights are the wrapped UNet2DModel's, and its plain
    forward is what gets saved.
    """

    def __init__(self, unet: UNet2DModel, fill: str = "zero"):
        super().__init__()
        if fill not in ("zero", "shuffle"):
            raise ValueError(f"skip dropout fill {fill!r}: use zero or shuffle")
        self.unet, self.fill = unet, fill

    def forward(self, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,), keep (B,) bool -> predicted noise (B, C, H, W)."""
        temb = embed_time(self.unet, t, x.shape[0])  # (B, D)
        h, skips = encode(self.unet, x, t, temb=temb)
        mask = keep[:, None, None, None]  # (B, 1, 1, 1)
        other = (lambda s: torch.zeros_like(s)) if self.fill == "zero" else (lambda s: s.roll(1, dims=0))
        skips = tuple(s if s.shape[-1] == x.shape[-1] else torch.where(mask, s, other(s)) for s in skips)
        return decode(self.unet, h, skips, temb, t)


def compile_blocks(unet: UNet2DModel, **compile_kwargs) -> UNet2DModel:
    """torch.compile, in place, the sub-modules encode/decode call; encode/decode then run compiled code.

    The mid block's own layers are compiled rather than the mid block, so a forward hook on `unet.mid_block` (the
    naive reference's mixing point) stays outside the compiled graphs and never forces a recompile.
    """
    check_supported(unet)
    modules = [unet.conv_in, unet.time_embedding, *unet.down_blocks, *unet.up_blocks, unet.conv_out]
    if unet.mid_block is not None:
        modules += [m for m in unet.mid_block.attentions if m is not None] + list(unet.mid_block.resnets)
    for module in modules:
        if module is not None:
            module.compile(**compile_kwargs)
    return unet
