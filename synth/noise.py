"""Where the sampler's Gaussian noise comes from: keyed on (seed, anchor id, candidate, draw, step), never on a row's
place in a batch, its rank or the world size, so a row's output is the same in any batch layout.

Two generators of noise, named by `SamplerConfig.noise` and recorded in every manifest (a different generator gives
different bytes from the same seed):

  "counter"        (default) Philox4x32-10 (Salmon et al., SC 2011), a counter-based generator written in integer
                   tensor ops so it runs on the sampler's device: one batched call per draw, no per-row CPU work and no
                   host-to-device copy. key = candidate_seed (64 bits), counter = (element quad, step, draw, "CLSP");
                   four 32-bit words -> two Box-Muller pairs -> four N(0, 1) values.
  "cpu-generator"  one CPU torch.Generator per row, drawn row by row and copied over: the generator of shards made
                   before the counter one (manifests that name no generator of noise); kept so those runs resume and
                   reproduce byte for byte.

The integer stream of "counter" is the same on every device (tests check Philox's published known answers); its normal
values go through log/sqrt/cos, whose last bit may differ between a CPU and a GPU.
"""
from __future__ import annotations

import math

import torch

from clsp.hashing import keyed_seed
from clsp.shards.schema import LEGACY_NOISE, NOISE_KINDS  # LEGACY_NOISE: what a manifest without sampler.noise
# was made with
START, ANCHOR, VARIANCE = 0, 1, 2  # the draws: x_T once; per step, the anchor's noised copy and DDIM's variance noise
_TAG = 0x434C5350  # "CLSP": the fourth counter word, separating this use of a key from any other
_M32 = 0xFFFFFFFF
_ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_BUMPS = (0x9E3779B9, 0xBB67AE85)


def candidate_seed(seed: int, anchor_id: str, candidate: int | str) -> int:
    """63-bit key of (run seed, anchor id, candidate); candidate "anchor" keys an anchor's shared noise."""
    if not isinstance(anchor_id, str) or not anchor_id:
        raise ValueError(f"anchor_id must be a non-empty string, got {anchor_id!r}")
    return keyed_seed("clsp", int(seed), anchor_id, candidate)


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * multiplier for a in [0, 2^32) held in int64: the product is formed from 16-bit
    halves of the multiplier so no intermediate passes 2^50 (int64 has no unsigned 64-bit multiply-high)."""
    low_part = a * (multiplier & 0xFFFF)  # < 2^48
    high_part = a * (multiplier >> 16)  # < 2^48, worth high_part * 2^16
    low_sum = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    return (high_part >> 16) + (low_sum >> 32), low_sum & _M32


def philox4x32(counter: list[torch.Tensor], key: list[torch.Tensor], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32 on int64 tensors holding 32-bit words: counter [c0..c3], key [k0, k1] (broadcastable) -> 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _ROUND_MULTIPLIERS[0])
        hi1, lo1 = _mulhilo(c2, _ROUND_MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_BUMPS[0]) & _M32, (k1 + _KEY_BUMPS[1]) & _M32
    return [c0, c1, c2, c3]


def counter_normal(keys: torch.Tensor, draw: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """keys (R,) int64 on the target device -> (R, *shape) float32 N(0, 1) on that device; element e of row r is a
    function of (keys[r], draw, step, e) alone."""
    numel = math.prod(shape)
    quads = -(-numel // 4)
    device = keys.device
    c0 = torch.arange(quads, device=device, dtype=torch.int64)[None, :]  # (1, Q): which quad of the row
    counter = [c0, torch.full_like(c0, step & _M32), torch.full_like(c0, draw), torch.full_like(c0, _TAG)]
    key = [(keys & _M32)[:, None], ((keys >> 32) & _M32)[:, None]]  # (R, 1) each
    words = philox4x32(counter, key)  # 4 x (R, Q)
    # 24-bit uniforms in (0, 1): u = (w >> 8 + 0.5) / 2^24, so log(u) is finite
    u = [((w >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0) for w in words]
    radius = [torch.sqrt(-2.0 * torch.log(u[0])), torch.sqrt(-2.0 * torch.log(u[2]))]
    angle = [2.0 * math.pi * u[1], 2.0 * math.pi * u[3]]
    values = torch.stack([radius[0] * torch.cos(angle[0]), radius[0] * torch.sin(angle[0]),
                          radius[1] * torch.cos(angle[1]), radius[1] * torch.sin(angle[1])], dim=2)  # (R, Q, 4)
    return values.reshape(len(keys), quads * 4)[:, :numel].reshape(len(keys), *shape)


class RowNoise:
    """The noise of one batch of sampler rows. The sampler asks, in this order: start(), then per step i
    anchor(i) and (when eta > 0) variance(i). anchor_row (B,) maps each row to its anchor-noise group: rows that share
    their anchor's noise (share_anchor_noise) share a group, otherwise each row is its own."""

    rows: int
    anchor_row: torch.Tensor  # (B,) long, on the CPU

    def to_device(self, device: torch.device) -> None:
        """Move what the draws on `device` need there ahead of the sampler's loop (which then copies nothing over)."""

    def start(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:  # (B, *shape)
        raise NotImplementedError

    def anchor(self, step: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:  # (A, *shape)
        raise NotImplementedError

    def variance(self, step: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:  # (B, *shape)
        raise NotImplementedError


_COMPILED: dict[str, object] = {}  # backend -> counter_normal compiled with it (one per process: compiled once)


def compiled_counter_normal(backend: str = "inductor"):
    """counter_normal as one traced graph (torch.compile, fullgraph: no graph breaks): on a GPU inductor fuses the ~200
    small integer kernels of an eager draw into one. The Philox words are the same integers; the normal values may
    differ from eager ones in the last bits (log, sqrt, cos), so a compiled job records `compiled`. The step, the draw
    and the row count change between calls: after the first change dynamo makes them symbolic (a few compiles per
    run, not one per step)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(counter_normal, backend=backend, fullgraph=True)
    return _COMPILED[backend]


class CounterNoise(RowNoise):
    """Philox noise: row keys (B,) and anchor keys (B,), equal within a group that shares its anchor's noise.
    compile_backend: draw with compiled_counter_normal(backend) (`--compile` on a GPU: "inductor"); None: eager."""

    def __init__(self, keys: list[int], anchor_keys: list[int], compile_backend: str | None = None):
        if len(keys) != len(anchor_keys):
            raise ValueError(f"need one anchor key per row: {len(anchor_keys)} for {len(keys)} rows")
        self._normal = counter_normal if compile_backend is None else compiled_counter_normal(compile_backend)
        self.rows = len(keys)
        self.keys = torch.tensor(keys, dtype=torch.int64)  # (B,)
        group = {}  # anchor key -> its group, numbered in first-row order (not by key value, as torch.unique
        for key in anchor_keys:  # would): batches of one layout then share anchor_row, which a CUDA graph holds fixed
            group.setdefault(key, len(group))
        self.group_keys = torch.tensor(list(group), dtype=torch.int64)  # (A,)
        self.anchor_row = torch.tensor([group[key] for key in anchor_keys], dtype=torch.int64)  # (B,) row -> group
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _keys(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (self.keys.to(device), self.group_keys.to(device))
        return self._on[device]

    def to_device(self, device):
        self._keys(device)

    def set_keys(self, other: "CounterNoise") -> None:
        """Take the keys of `other` (the same rows and groups) in place: the key tensors already on a device keep
        their memory, which a captured CUDA graph reads (synth/cuda_graph.py)."""
        if other.keys.shape != self.keys.shape or other.group_keys.shape != self.group_keys.shape:
            raise ValueError(f"need keys for {len(self.keys)} rows in {len(self.group_keys)} groups, got "
                             f"{len(other.keys)} rows in {len(other.group_keys)} groups")
        for keys, group_keys in [(self.keys, self.group_keys), *self._on.values()]:
            keys.copy_(other.keys)
            group_keys.copy_(other.group_keys)

    def start(self, shape, device):
        return self._normal(self._keys(device)[0], START, 0, shape)

    def anchor(self, step, shape, device):
        return self._normal(self._keys(device)[1], ANCHOR, step, shape)

    def variance(self, step, shape, device):
        return self._normal(self._keys(device)[0], VARIANCE, step, shape)


class GeneratorNoise(RowNoise):
    """"cpu-generator" noise: one CPU generator per row, drawn in the order start, then per step anchor (groups in
    first-row order), variance. anchor_generators: one per row (rows that share one object share its draws), or None:
    the anchor noise then comes from the row's own generator."""

    def __init__(self, generators: list[torch.Generator], anchor_generators: list[torch.Generator] | None = None):
        self.rows, self.generators = len(generators), generators
        if anchor_generators is None:
            self.groups = [g for g in generators]
            self.anchor_row = torch.arange(len(generators))
            return
        if len(anchor_generators) != len(generators):
            raise ValueError(f"need one anchor generator per row: {len(anchor_generators)} for {len(generators)} rows")
        first: dict[int, int] = {}
        for g in anchor_generators:
            first.setdefault(id(g), len(first))
        self.groups = list({id(g): g for g in anchor_generators}.values())  # in first-row order
        self.anchor_row = torch.tensor([first[id(g)] for g in anchor_generators])

    @staticmethod
    def _draw(generators, shape, device) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    def start(self, shape, device):
        return self._draw(self.generators, shape, device)

    def anchor(self, step, shape, device):
        return self._draw(self.groups, shape, device)

    def variance(self, step, shape, device):
        return self._draw(self.generators, shape, device)


def row_noise(kind: str, seed: int, anchor_ids: list[str], k: int, share_anchor_noise: bool,
              compile_backend: str | None = None) -> RowNoise:
    """The noise of rows a * k + j (candidate j of anchor_ids[a]), keyed on candidate_seed(seed, id, j); with
    share_anchor_noise the K rows of an anchor share the anchor noise keyed on candidate_seed(seed, id, "anchor").
    compile_backend: counter noise drawn by compiled code (CounterNoise); the CPU generators ignore it."""
    keys = [candidate_seed(seed, a, j) for a in anchor_ids for j in range(k)]
    shared = [candidate_seed(seed, a, "anchor") for a in anchor_ids for _ in range(k)]
    if kind == "counter":
        return CounterNoise(keys, shared if share_anchor_noise else keys, compile_backend)
    if kind == LEGACY_NOISE:
        generators = [torch.Generator("cpu").manual_seed(s) for s in keys]
        if not share_anchor_noise:
            return GeneratorNoise(generators)
        per_anchor = [torch.Generator("cpu").manual_seed(s) for s in shared[::k]]
        return GeneratorNoise(generators, [g for g in per_anchor for _ in range(k)])
    raise ValueError(f"unknown generator of noise {kind!r}: choose one of {NOISE_KINDS}")
