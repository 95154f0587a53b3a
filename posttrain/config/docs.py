"""Generate docs/config.md from the config dataclasses: ``python -m posttrain.config.docs``."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import get_type_hints

from posttrain.config.loader import _type_name


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "(section)" if dataclasses.is_dataclass(value) else value
    return "(required)"


def section_table(cls: type, prefix: str = "") -> list[str]:
    """Markdown rows for ``cls``, recursing into nested sections."""
    hints = get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((hints[f.name], key + "."))
            continue
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        default = repr(_default(f)).replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(hints[f.name])} | `{default}` | {help_text} |")
    for sub, sub_prefix in nested:
        rows += section_table(sub, sub_prefix)
    return rows


def render() -> str:
    from posttrain.trainers import TRAINERS, trainer_module

    parts = ["# Recipe configuration reference", "",
             "Generated from the config dataclasses by `python -m posttrain.config.docs`; do not edit by hand.",
             "Every key can be overridden on the command line as `key.sub=value`. An unknown key is an error that",
             "names the closest valid key.", ""]
    for name in TRAINERS:
        module = trainer_module(name)
        parts += [f"## trainer: `{name}`", "", (module.__doc__ or "").strip().splitlines()[0], "",
                  "| key | type | default | meaning |", "| --- | --- | --- | --- |", *section_table(module.Config), ""]
    return "\n".join(parts)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "docs" / "config.md"
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
