"""The project's two hashes: seeds keyed on names (never on ranks or batch positions) and a hash of weights."""
from __future__ import annotations

import hashlib

import torch


def keyed_seed(*parts: object) -> int:
    """63-bit seed from sha256 of the parts joined by '|': the same on every machine, rank and batch layout."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def weights_sha256(model_or_state_dict: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict tensor in sorted name order.

    It identifies the weights themselves, whatever file format or layout they were stored in.
    """
    state = model_or_state_dict
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)  # 1-D: a 0-d tensor has no byte view
        digest.update(f"{name}|{tensor.dtype}|{tuple(state[name].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
