"""How every command combines a named preset with the options given on the command line."""
from __future__ import annotations

from clsp.errors import UserError


def preset_values(presets: dict[str, dict], preset: str | None, options: dict) -> dict:
    """The preset's values (none when preset is None), overridden by every option that is not None (= not given)."""
    if preset is not None and preset not in presets:
        raise UserError(f"unknown preset {preset!r}: use one of {', '.join(sorted(presets))}")
    given = {name: value for name, value in options.items() if value is not None}
    return {**(presets[preset] if preset else {}), **given}
