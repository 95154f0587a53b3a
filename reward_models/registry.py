"""Reward names: the built-ins, rewards registered in code, and the ``posttrain.rewards`` entry points.

A name resolves, in this order, to a reward registered with ``register_reward``, a
built-in, or an entry point of the ``posttrain.rewards`` group. Built-ins are stored
as ``module:attribute`` strings so that ``import reward_models`` stays light (torch,
sacrebleu and math-verify load only when their reward is used).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from importlib import metadata

from posttrain.errors import UserError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "posttrain.rewards"

BUILTINS: dict[str, str] = {
    "math_verify": "reward_models.math_answer:math_verify",
    "bleu": "reward_models.bleu:bleu",
    "unit_test": "reward_models.unit_test:unit_test",
    "code_efficiency": "reward_models.code_efficiency:code_efficiency",
    "format": "reward_models.format_reward:format_reward",
    "length": "reward_models.length:length",
    "orm": "reward_models.orm:orm",
    "prm": "reward_models.prm:prm",
    "judge": "reward_models.judge:judge",
    "remote": "reward_models.remote:remote",
}

_registered: dict[str, object] = {}
_FACTORY_FLAG = "__posttrain_reward_factory__"


def reward_factory(fn):
    """Mark ``fn`` as a factory: it takes keyword settings and returns a reward function.

    Without the mark, an object found by name is the reward function itself, and
    settings given to ``load_reward`` are bound to it as keyword arguments.
    """
    setattr(fn, _FACTORY_FLAG, True)
    return fn


def is_factory(obj: object) -> bool:
    """Marked with ``@reward_factory``, or one of TRL's reward factories (``trl.rewards.get_*``, such as
    ``get_soft_overlong_punishment``: settings in, reward function out)."""
    if getattr(obj, _FACTORY_FLAG, False):
        return True
    module, name = getattr(obj, "__module__", None) or "", getattr(obj, "__name__", None) or ""
    return inspect.isfunction(obj) and module.split(".")[:2] == ["trl", "rewards"] and name.startswith("get_")


def register_reward(name: str, obj: object = None, *, overwrite: bool = False):
    """Register a reward function, factory or class under ``name``; usable as a decorator.

    >>> @register_reward("shout")
    ... def shout(prompts, completions, **columns):
    ...     return [float(c.isupper()) for c in completions]
    """

    def add(target: object) -> object:
        if not overwrite and (name in _registered or name in BUILTINS):
            raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
        _registered[name] = target
        return target

    return add if obj is None else add(obj)


def unregister_reward(name: str) -> None:
    """Remove a reward registered with ``register_reward`` (tests, notebooks)."""
    _registered.pop(name, None)


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)  # first on sys.path wins, like imports
    return found


def available_rewards() -> dict[str, str]:
    """Every known name and where it comes from (``builtin``, ``registered``, ``entry point <value>``)."""
    names = {name: f"entry point {ep.value}" for name, ep in _entry_points().items()}
    names.update({name: "builtin" for name in BUILTINS})
    names.update({name: "registered" for name in _registered})
    return dict(sorted(names.items()))


def import_attribute(target: str, what: str) -> object:
    """``pkg.mod:attr.sub`` -> the object; errors name ``what`` (the user's spelling)."""
    module_name, _, attr_path = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise UserError(f"reward {what!r}: cannot import module {module_name!r} ({err}).",
                            hint="Check the spelling, and that the package is installed or on PYTHONPATH.") from None
        raise
    obj: object = module
    for part in attr_path.split(".") if attr_path else []:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            public = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1)
            hint = f"Did you mean {module_name}:{close[0]}?" if close else None
            raise UserError(f"reward {what!r}: module {module_name!r} has no attribute {attr_path!r}.",
                            hint=hint) from None
    return obj


def lookup(name: str) -> object:
    """The object registered under ``name``; a UserError naming the closest known name otherwise."""
    if name in _registered:
        return _registered[name]
    if name in BUILTINS:
        return import_attribute(BUILTINS[name], name)
    points = _entry_points()
    if name in points:
        try:
            return points[name].load()
        except (ImportError, AttributeError) as err:
            raise UserError(f"reward {name!r}: its entry point {points[name].value!r} "
                            f"(group {ENTRY_POINT_GROUP}) could not be loaded: {err}") from None
    known = available_rewards()
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"Did you mean {close[0]!r}?" if close else (
        f"Known rewards: {', '.join(known)}. A reward can also be a dotted path 'pkg.module:function' "
        "or a file path './file.py:function'."
    )
    raise UserError(f"unknown reward {name!r}.", hint=hint)
