"""Turn a reward spec (name, dotted path, file path, or a callable) and its settings into a ``Reward``.

Spec forms:
  - ``"bleu"``: a registered name, a built-in, or a ``posttrain.rewards`` entry point;
  - ``"my_pkg.rewards:fn"``: a dotted path (``module:attribute``);
  - ``"./my_rewards.py:fn"`` (or an absolute path): a function in a Python file;
  - a Python callable.

What is found is used in one of three ways: a class is instantiated with the
settings; a function marked with ``@reward_factory`` is called with them and
returns the reward function; anything else callable *is* the reward function,
and settings are bound to it as keyword arguments (``functools.partial``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from posttrain.errors import UserError
from reward_models.convention import CallConvention
from reward_models.registry import import_attribute, is_factory, lookup
from reward_models.types import Column

_REWARD_POSITIONALS = ("prompts", "completions")


class Reward:
    """A loaded reward: the reward callable plus what it was loaded from.

    ``reward(prompts, completions, trainer_state=None, **columns)`` (positionally or by keyword, as TRL
    calls it) calls the reward function by the rule of ``reward_models.convention``. ``spec`` and ``args`` let a worker process
    load the same reward again (``isolation="process"``); ``columns`` lists the
    dataset columns it reads (empty when the function does not declare them).
    """

    def __init__(self, fn: Callable, *, name: str, spec: str | None = None,
                 args: Mapping[str, object] | None = None, columns: tuple[Column, ...] = ()) -> None:
        self.fn = fn
        self.name = name
        self.__name__ = name  # TRL logs reward functions by __name__
        self.spec = spec
        self.args = dict(args or {})
        self.columns = columns
        self.convention = CallConvention(fn, name)

    @property
    def is_async(self) -> bool:
        target = self.fn
        if inspect.iscoroutinefunction(target):
            return True
        # a callable object whose __call__ is a coroutine function
        return callable(target) and inspect.iscoroutinefunction(type(target).__call__)

    def arguments(self, prompts: list, completions: list, columns: Mapping[str, object],
                  trainer_state: object = None) -> tuple[tuple, dict]:
        """The (positional, keyword) arguments the function is called with; a ``UserError`` when none fit."""
        return self.convention.arguments(prompts, completions, columns, trainer_state)

    def __call__(self, prompts: list, completions: list, trainer_state: object = None, **columns):
        args, kwargs = self.arguments(prompts, completions, columns, trainer_state)
        return self.fn(*args, **kwargs)

    def close(self) -> None:
        """Release what the reward holds (worker pools, models), when it holds anything."""
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, spec={self.spec!r}, args={self.args!r})"


def parse_spec(spec: str) -> tuple[str, str, str]:
    """Classify a spec string: ``("file", path, attr)``, ``("dotted", "mod:attr", attr)`` or ``("name", name, "")``."""
    head, sep, attr = spec.rpartition(":")
    if sep and (head.endswith(".py") or "/" in head or head.startswith(".")):
        if not attr:
            raise UserError(f"reward {spec!r}: a file path needs the function name after a colon, e.g. "
                            f"'{head}:my_reward'.")
        return "file", head, attr
    if sep:
        if not head or not attr:
            raise UserError(f"reward {spec!r}: expected 'package.module:function'.")
        return "dotted", spec, attr
    if spec.endswith(".py"):
        raise UserError(f"reward {spec!r}: name the function in the file, e.g. '{spec}:my_reward'.")
    return "name", spec, ""


def _module_from_file(path: str, spec: str) -> object:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise UserError(f"reward {spec!r}: file {str(file)!r} does not exist.")
    # One module per file, named after its path, so loading twice reuses it.
    module_name = "posttrain_user_rewards_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    # The file's directory is importable while it loads, so it can import its sibling helpers.
    sys.path.insert(0, str(file.parent))
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        sys.path.remove(str(file.parent))
    return module


def resolve(spec: str) -> tuple[object, str, str]:
    """The object a spec names, its default display name, and the spec in reloadable form."""
    kind, target, attr = parse_spec(spec)
    if kind == "name":
        return lookup(target), target, target
    if kind == "dotted":
        return import_attribute(target, spec), attr.split(".")[-1], target
    module = _module_from_file(target, spec)
    if not hasattr(module, attr):
        public = [n for n in vars(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=1)
        raise UserError(f"reward {spec!r}: {target!r} defines no {attr!r}.",
                        hint=f"Did you mean {close[0]!r}?" if close else None)
    absolute = str(Path(target).expanduser().resolve())
    return getattr(module, attr), attr, f"{absolute}:{attr}"


def accepted_args(target: Callable, skip: tuple[str, ...] = ()) -> tuple[set[str], set[str], bool]:
    """(all keyword names, required names, accepts **kwargs) of a callable, skipping ``skip``."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins without signatures: accept anything
        return set(), set(), True
    names, required, var_kw = set(), set(), False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip:
            names.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
    return names, required, var_kw


def _check_args(target: Callable, args: Mapping[str, object], spec: str, *, factory: bool) -> None:
    names, required, var_kw = accepted_args(target, skip=() if factory else _REWARD_POSITIONALS)
    # A plain reward's **columns is for dataset columns: a setting must name a parameter, so a
    # misspelt one is an error rather than an unused column.
    unknown = [k for k in args if k not in names and not (var_kw and factory)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        accepted = ", ".join(sorted(names)) or "none"
        raise UserError(f"reward {spec!r} has no argument {unknown[0]!r} (it accepts: {accepted}).",
                        hint=f"Did you mean {close[0]!r}?" if close else None)
    if factory:
        missing = sorted(required - set(args))
        if missing:
            raise UserError(f"reward {spec!r} needs the argument {missing[0]!r}.",
                            hint="Give it in the recipe's args, or with --reward-arg "
                                 f"{missing[0]}=VALUE on the command line.")


def _declared_columns(obj: object) -> tuple[Column, ...]:
    while isinstance(obj, functools.partial):
        obj = obj.func
    return tuple(getattr(obj, "reward_columns", ()))


def build_reward(obj: object, args: Mapping[str, object], *, name: str, spec: str | None,
                 defaults: Mapping[str, object] | None = None) -> Reward:
    """Make a ``Reward`` from a found object and its settings (see the module docstring).

    ``defaults`` are settings applied only when the target accepts them and the
    user did not give them (``workers`` from ``--workers``, for example).
    """
    where = spec or name
    args = dict(args)
    is_class = inspect.isclass(obj)
    factory = is_class or is_factory(obj)
    if not callable(obj):
        raise UserError(f"reward {where!r} is a {type(obj).__name__}, not a function or class.")
    target = obj  # inspect.signature of a class gives its __init__ without self
    if defaults:
        names, _, var_kw = accepted_args(target, skip=() if factory else _REWARD_POSITIONALS)
        for key, value in defaults.items():
            if key not in args and (key in names or (factory and var_kw)):
                args[key] = value
    _check_args(target, args, where, factory=factory)
    if factory:
        fn = obj(**args)
        if not callable(fn):
            raise UserError(f"reward {where!r}: its factory returned a {type(fn).__name__}, not a function.")
    else:
        fn = functools.partial(obj, **args) if args else obj
    return Reward(fn, name=name, spec=spec, args=args, columns=_declared_columns(fn))


def load_reward(spec: str | Callable, /, **args: object) -> Reward:
    """Load a reward by registry name, ``pkg.mod:fn``, ``./file.py:fn``, entry point, or from a callable.

    ``args`` configure it: they are passed to a factory or class, or bound to a
    plain reward function as keyword arguments. Raises ``UserError`` for unknown
    names, missing files, and arguments the reward does not accept.
    """
    return load_reward_with_defaults(spec, args)


def load_reward_with_defaults(spec: str | Callable, args: Mapping[str, object],
                              defaults: Mapping[str, object] | None = None) -> Reward:
    """``load_reward`` with ``defaults`` that apply where the reward accepts them (see ``build_reward``)."""
    if isinstance(spec, Reward):
        if args:
            raise UserError(f"reward {spec.name!r} is already built; give its arguments when loading it.")
        return spec
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return build_reward(spec, args, name=name, spec=None, defaults=defaults)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"a reward must be a name, a 'module:function' path or a file path, got {spec!r}.")
    obj, name, reloadable = resolve(os.path.expandvars(spec.strip()))
    return build_reward(obj, args, name=name, spec=reloadable, defaults=defaults)
