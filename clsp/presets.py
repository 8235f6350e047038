"""How every command combines a named preset with the options given on the command line."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from clsp.errors import UserError


def preset_values(presets: dict[str, dict], preset: str | None, options: dict) -> dict:
    """The preset's values (none when preset is None), overridden by every option that is not None (= not given)."""
    if preset is not None and preset not in presets:
        raise UserError(f"unknown preset {preset!r}: use one of {', '.join(sorted(presets))}")
    given = {name: value for name, value in options.items() if value is not None}
    return {**(presets[preset] if preset else {}), **given}


# Help text: the defaults `--help` shows are read from the config dataclasses and PRESETS dicts themselves (one place),
# from their source with `ast`, because importing those modules imports torch (seconds) and `--help` must stay fast.

def _literal(node: ast.AST):
    """The value of a literal expression, with `dict(key=value, ...)` allowed; _NOT_LITERAL for anything else."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.Dict) and None not in node.keys:  # {"embedded": dict(...)}: the values need the rule above
        return {ast.literal_eval(key): _literal(value) for key, value in zip(node.keys, node.values)}
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _NOT_LITERAL


_NOT_LITERAL = object()


def _module_tree(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)  # finds the file; imports only the parent packages (cheap)
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def source_fields(module: str, name: str) -> list[tuple[str, str, object]]:
    """[(field, annotation as written, literal default)] of dataclass `name` in `module`, in order, read without
    importing it (fields without a literal default are left out)."""
    for node in _module_tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            found = [(item.target.id, ast.unparse(item.annotation), _literal(item.value)) for item in node.body
                     if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value]
            return [entry for entry in found if entry[2] is not _NOT_LITERAL]
    raise LookupError(f"{module} defines no class {name}")


def source_literal(module: str, name: str):
    """The literal value of the top-level assignment `name = ...` in `module`, read without importing it."""
    for node in _module_tree(module).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{module} assigns no {name}")


def source_defaults(module: str, name: str) -> dict:
    """{field: default} of dataclass `name` in `module`, or the top-level dict `name` (PRESETS), read without importing
    the module. Defaults that are not literals (field(default_factory=...)) are left out; tests/test_hub_and_help.py
    checks the result against the imported objects."""
    for node in _module_tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            found = {item.target.id: _literal(item.value) for item in node.body
                     if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value}
            return {key: value for key, value in found.items() if value is not _NOT_LITERAL}
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            value = _literal(node.value)
            return {key: {k: v for k, v in preset.items() if v is not _NOT_LITERAL} for key, preset in value.items()}
    raise LookupError(f"{module} defines no class or dict {name}")


def shown(value) -> str:
    """A default as the user would type it: on/off for flags, comma-joined lists (as --channels takes them)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def default_note(name: str, defaults: dict, presets: dict[str, dict]) -> str:
    """'[default: 100; --preset embedded: 50]' for option `name`: its default and the presets that change it (empty
    when neither holds a value for it)."""
    default = defaults.get(name)
    parts = [f"default: {shown(default)}"] if default is not None else []
    parts += [f"--preset {preset}: {shown(values[name])}" for preset, values in presets.items()
              if values.get(name, default) != default]
    return f"[{'; '.join(parts)}]" if parts else ""
