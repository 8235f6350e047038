"""The import floors of ARCHITECTURE.md, read from the source: shards/ imports nothing else of the project (a team
that only reads shards needs only it), and nothing below the orchestration floor imports it."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"clsp": ROOT / "clsp", "clsp.shards": ROOT / "shards", "clsp.synth": ROOT / "synth",
            "clsp.train": ROOT / "train", "clsp.train.methods": ROOT / "train" / "methods", "clsp.eval": ROOT / "eval"}
ORCHESTRATION = {"clsp.cli", "clsp.data_cli", "clsp.study", "clsp.bench", "clsp.bench_report", "clsp.__main__"}
STAGES = ("clsp.synth", "clsp.train", "clsp.eval")


def floor(module: str) -> int:
    """0 contract, 1 shared, 2 stages, 3 orchestration (each stage's cli and bench modules included)."""
    last = module.rpartition(".")[2]
    if module in ORCHESTRATION or last.endswith("cli") or last == "bench":
        return 3
    if module == "clsp.shards" or module.startswith("clsp.shards."):
        return 0
    return 2 if module.startswith(STAGES) else 1


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(path: Path, module: str) -> set[str]:
    """Every module of ours that `path` imports, at its top or inside a function."""
    names = set()
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
    return {name for name in names if name == "clsp" or name.startswith("clsp.")}


def test_the_floors_are_read_from_every_module_of_the_package():
    found = modules()
    assert {"clsp.shards.manifest_writer", "clsp.train.loop", "clsp.eval.cli", "clsp.accelerator"} <= set(found)
    assert floor("clsp.shards.manifest_writer") == 0 and floor("clsp.shards.cli") == 3
    assert floor("clsp.synth.diffusion_cli") == 3 and floor("clsp.train.bench") == 3 and floor("clsp.train.loop") == 2
    assert imported(found["clsp.shards.manifest_writer"], "clsp.shards.manifest_writer") >= {"clsp.shards.schema"}


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_its_own_floor_and_those_below(module):
    path = modules()[module]
    own = floor(module)
    above = sorted(name for name in imported(path, module) if name != "clsp" and floor(name) > own)
    assert not above, f"{module} (floor {own}) imports {above} from a floor above it"
    if own == 0:  # the contract imports nothing else of the project, not even the shared floor
        outside = sorted(name for name in imported(path, module) if floor(name) != 0)
        assert not outside, f"{module} is in shards/, which imports nothing else of the project, but imports {outside}"
