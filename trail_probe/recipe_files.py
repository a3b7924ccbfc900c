"""Recipe files as plain data: the YAML of a recipe (with the recipe it starts from, `base:`) and the
dotted `key=value` overrides of the command line. `trail_probe.config` types and checks the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trail_probe.errors import UserError


# Keys of earlier versions, so a saved recipe or a habit fails with the new name instead of a list.
_REFINE = "one refine section for eval, simulate and serve-bench"
MOVED = {
    "eval.refine_interval": ("refine.interval", _REFINE), "eval.refine_likelihood": ("refine.likelihood", _REFINE),
    "eval.refine_prior": ("refine.prior", _REFINE), "serve.refine_interval": ("refine.interval", _REFINE),
    "serve.refine_likelihood": ("refine.likelihood", _REFINE), "serve.preemption_c": ("refine.preemption_c", _REFINE),
    "simulate.refine_interval": ("refine.interval", _REFINE), "simulate.preemption_c": ("refine.preemption_c", _REFINE),
    "extract.pooled_inputs": ("extract.inputs", "pooled_inputs=true is extract.inputs=all, false is extract.inputs=trail; "
                              "the default, trained, stores what the recipe's probes read"),
}


def read_recipe_file(path: Path) -> dict:
    """The recipe's sections; `base: other.yaml` (relative to the recipe's folder) is read first and
    the recipe's own keys are applied over it."""
    return _read(path, ())


def set_override(data: dict, text: str) -> None:
    """Apply one `section.key=value` override to the recipe's data, in place."""
    key, value = parse_override(text)
    _set_dotted(data, key, value)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}' goes into '{k}', which is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.001` -> ("train.lr", 0.001); values are parsed as YAML scalars/lists."""
    if "=" not in text or text.startswith("="):
        raise UserError(f"override '{text}' is not of the form key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _read(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise UserError(f"recipe '{path}' not found; pass a YAML file such as recipes/smollm2_alpaca.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe '{path}' is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe '{path}' is not a mapping of sections; see recipes/smollm2_alpaca.yaml")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen or base_path == path.resolve():
        raise UserError(f"recipe '{path}': base '{base}' leads back to itself; point base at another recipe")
    return _merged(_read(base_path, seen + (path.resolve(),)), data)


def _merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied: sections merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
