"""Shared test fixtures: data the tests make themselves (shard directories, Parquet files, image folders), and a watch
for host reads of device values (host_traffic)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clsp.shards  # noqa: F401  (before torch: loads pyarrow first, see shards/__init__.py)
import torch

torch.set_num_threads(1)  # CI has 2 cores; tiny models run faster single-threaded and leave room for subprocess tests

from clsp.shards.manifest_writer import write_manifest
from clsp.shards.schema import ShardSample
from clsp.shards.writer import ShardWriter, shard_name
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Planted:
    """A pickle that creates `marker` (a file) if it is ever unpickled: proof that something ran. Pickled by reference
    to this module, so a `weights_only` load or an allow-list unpickler must refuse it without running anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def dead_pid() -> int:
    """The pid of a process that has ended: the PID in the .NAME.tmp-PID name of a write a kill cut short."""
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def as_a_terminals_job() -> None:
    """A subprocess's preexec_fn: SIGINT as a terminal's foreground job has it. Run in the background by a shell
    (`make test &`), the tests inherit SIGINT ignored, and Python then installs no Ctrl-C handler in a child."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def lock_held(run_dir: Path) -> bool:
    """Whether a process holds run_dir's flock (the kernel drops it when the last process that shares it ends)."""
    import fcntl

    lock = run_dir / ".clsp-lock"
    if not lock.is_file():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): compare two to prove nothing was changed or lost."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> a PNG file's bytes, by PIL (independent of the project's own encoder)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_hf_parquet(path: Path, images: list[np.ndarray], labels: list[int], class_names: list[str] | None = None,
                     row_group_size: int | None = None) -> None:
    """A Parquet file in the Hugging Face datasets image layout: an `img` column of {bytes, path} structs and a `label`
    column, with ClassLabel names in the schema metadata when `class_names` is given."""
    table = pa.table({"img": [{"bytes": png_bytes(i), "path": None} for i in images], "label": labels})
    if class_names is not None:
        features = {"img": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": class_names}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def random_sample(anchor_id: str, k: int, size: int, label: int, seed: int) -> ShardSample:
    rng = np.random.default_rng(seed)
    return ShardSample(anchor_id, rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                       rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8), label,
                       [int(s) for s in rng.integers(0, 2**62, k)])


def build_shard_dir(directory: Path, counts=(4, 4, 3), k: int = 2, size: int = 8, classes: int = 3,
                    codec: str = "png") -> Path:
    """A complete shard directory of random images: len(counts) shards holding counts[i] anchors each, images in
    `codec` (png: schema 2, raw: schema 3)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for index, count in enumerate(counts):
        with ShardWriter(directory / shard_name(index), k, size, codec) as writer:
            for _ in range(count):
                writer.write(random_sample(f"anchor-{n:05d}", k, size, n % classes, seed=n))
                n += 1
    run = {"source": {"spec": "test", "split": "train", "fingerprint": "0" * 64, "count": n},
           "generator": {"model_id": "none", "weights_sha256": "0" * 64}, "sampler": {"w": 0.1, "steps": 2, "eta": 0.1},
           "k": k, "seed": 0, "image_size": size, "anchors_per_shard": max(counts), "package_version": "test",
           "codec": codec}  # write_manifest records it for raw only
    write_manifest(directory, run)
    return directory


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return build_shard_dir(tmp_path / "shards")


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    """A saved untrained 8 px generator (an 8-channel UNet, DDIM scheduler) for the synth job's tests."""
    from diffusers import DDIMScheduler

    from clsp.synth.models import save_generator
    from clsp.synth.untrained_unets import tiny_unet

    out = tmp_path_factory.mktemp("gen") / "generator"
    save_generator(out, tiny_unet(sample_size=8, block_out_channels=(8, 8)),
                   DDIMScheduler(num_train_timesteps=1000, clip_sample=True), {"model_id": "tiny-test"})
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


class _HostTraffic(TorchDispatchMode):
    """Records (into `seen`) the ops that make the host wait for a device or copy onto it: reading a device tensor's
    value on the host (.item(), .tolist(), float(), a Python `if` on a tensor, a boolean mask), or an op between a CPU
    tensor and a device tensor. A 0-dim CPU tensor is allowed: it rides along as a kernel argument, as a Python number
    does. On the meta device a read has no value: it is recorded and answered with 1, so the run goes on and every
    read is listed."""

    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    # ops whose output's size depends on the values: the host waits for them to learn it
    SIZED_BY_VALUES = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
                       torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default,
                       torch.ops.aten.repeat_interleave.Tensor}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(t.device.type != "cpu" for t in tensors)
        if func is torch.ops.aten._local_scalar_dense.default and on_device:
            self.seen.append(str(func))
            return 1 if tensors[0].device.type == "meta" else func(*args, **(kwargs or {}))
        mask = func is torch.ops.aten.index.Tensor and any(t.dtype == torch.bool for t in tensors[1:])
        if on_device and (func in self.SIZED_BY_VALUES or mask):
            self.seen.append(str(func) + " (a boolean mask)" * mask)
        out = func(*args, **(kwargs or {}))
        tensors += [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type != "cpu" for t in tensors) and any(t.device.type == "cpu" and t.dim() for t in tensors):
            self.seen.append(str(func))
        return out


class _HostData(TorchFunctionMode):
    """Records torch.tensor / torch.as_tensor calls that put host data on a device, which copy below the dispatcher."""

    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        device = (kwargs or {}).get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device).type != "cpu":
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_traffic():
    """Within: the list of host reads of device values and copies from the host onto a device (run the code on the
    meta device to check it on a machine without a GPU). Empty: the code queues device work only, so on a GPU the host
    runs ahead and a CUDA graph can capture it."""
    from torch.fx.experimental import _config as fx_config

    seen: list[str] = []
    # a meta boolean mask then selects every row (the meta device has no values), so the run goes on past it
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), _HostTraffic(seen), _HostData(seen):
        yield seen
