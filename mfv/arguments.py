"""Bare list values on a jsonargparse command line: ``--relations agentic`` is ``--relations
[agentic]`` (:func:`bracket_lists`). Used by every command's parser (:mod:`mfv.cli`,
:mod:`mfv.commands.train`, :mod:`mfv.demo`, GQA preparation); imports nothing of mfv."""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import re
import types
import typing
from pathlib import PurePath
from typing import Any, Callable, Sequence

_SEQUENCES = (list, set, frozenset, collections.abc.Sequence, collections.abc.MutableSequence,
              collections.abc.Set, collections.abc.Collection, collections.abc.Iterable)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _is_text(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return all(_is_text(a) for a in typing.get_args(hint) if a is not type(None))
    return isinstance(hint, type) and issubclass(hint, (str, PurePath))


def _list_of_text(hint: Any) -> bool | None:
    """``None`` unless ``hint`` is a list type (optionally ``| None``); else whether its
    elements are text (``str``, paths). ``str | list[str]`` is not a list type: a bare value
    already means something there."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        return _list_of_text(others[0]) if len(others) == 1 else None
    if origin is tuple:
        return _is_text(args[0]) if len(args) == 2 and args[1] is Ellipsis else None
    if origin in _SEQUENCES or hint in (list, tuple, set):
        return _is_text(args[0]) if args else True
    return None


def _dataclass_of(hint: Any) -> type | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(hint) if a is not type(None)]
        return _dataclass_of(others[0]) if len(others) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def list_options(target: Callable, prefix: str = "") -> dict[str, bool]:
    """The list-typed options a function's, class's or dataclass's parameters become on a
    jsonargparse command line (``--scene_graphs``, ``--settings.blacklist``), each with
    whether its elements are text. Nested dataclass parameters are followed."""
    function = target.__init__ if isinstance(target, type) else target
    try:
        hints = typing.get_type_hints(function)
        parameters = inspect.signature(target).parameters
    except (NameError, TypeError, ValueError):  # unresolvable annotations: nothing to rewrite
        return {}
    options: dict[str, bool] = {}
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or name not in hints:
            continue
        text = _list_of_text(hints[name])
        nested = _dataclass_of(hints[name])
        if text is not None:
            options[f"--{prefix}{name}"] = text
        elif nested is not None:
            options.update(list_options(nested, f"{prefix}{name}."))
    return options


def _is_bare(value: str) -> bool:
    return not value.lstrip().startswith(("[", "{", "(")) and value not in ("null", "None", "-", "")


def _is_value(token: str) -> bool:
    return not token.startswith("-") or token == "-" or _NUMBER.fullmatch(token) is not None


def _as_list(values: Sequence[str], text: bool) -> str:
    return "[" + ",".join(v if not text and _NUMBER.fullmatch(v) else json.dumps(v) for v in values) + "]"


def bracket_lists(argv: Sequence[str], *targets: Callable, **sections: Callable) -> list[str]:
    """``argv`` with the bare values of list options written as lists, for jsonargparse.

    jsonargparse reads a list option only as ``[a,b]``; a bare ``agentic`` is an error, and a
    bare path to a list of paths is read as a file *of* paths, one per line (a JSON file given
    that way is dumped into the error). Here ``--relations agentic`` becomes ``--relations
    ["agentic"]``, ``--scene_graphs a.json b.json`` becomes ``--scene_graphs ["a.json","b.json"]``
    and ``--relations=above`` becomes ``--relations=["above"]``; lists, ``null`` and ``-``
    (stdin) are kept. Nothing else is touched, so calling it twice changes nothing.

    Args:
        argv: The command line (without the program).
        targets: Functions, classes or dataclasses whose parameters are top-level options
            (``jsonargparse.CLI(prepare)``: ``bracket_lists(argv, prepare)``).
        sections: Classes whose parameters are options under a section
            (``model=FunctionVectorModule`` for ``--model.relations``).
    """
    options: dict[str, bool] = {}
    for target in targets:
        options.update(list_options(target))
    for section, target in sections.items():
        options.update(list_options(target, f"{section}."))
    argv, out, index = list(argv), [], 0
    while index < len(argv):
        token = argv[index]
        name, equals, value = token.partition("=")
        if name not in options:
            out.append(token)
            index += 1
        elif equals:
            out.append(f"{name}={_as_list([value], options[name])}" if _is_bare(value) else token)
            index += 1
        else:
            end = index + 1
            while end < len(argv) and _is_value(argv[end]):
                end += 1
            values = argv[index + 1:end]
            if values and all(_is_bare(v) for v in values):
                out += [name, _as_list(values, options[name])]
            else:
                out += argv[index:end]
            index = end
    return out
