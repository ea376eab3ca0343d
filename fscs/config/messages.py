"""Pydantic validation errors as one line per param: '<source>: <param> = <value>: expected ...'."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from fscs.core.errors import FscsError

_PLAIN = {
    "greater than or equal to ": ">= ",
    "less than or equal to ": "<= ",
    "greater than ": "> ",
    "less than ": "< ",
    "a valid integer": "an integer",
    "a valid number": "a number",
    "a valid boolean": "true or false",
    "a valid ": "a ",
}
_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}


def _param(error: dict[str, Any]) -> str:
    """The dotted param name of a pydantic error (union member tags such as "int" dropped)."""
    tags = ("[", "constrained-")
    return ".".join(
        str(p)
        for p in error["loc"]
        if isinstance(p, int) or not (p in _TYPE_TAGS or any(t in p for t in tags))
    )


def _describe(param: str, errors: list[dict[str, Any]], known: dict[str, list[str]], source: str) -> str:
    """The errors of one param as '<source>: <param> = <value>: expected ...'."""
    first = errors[0]
    if first["type"] == "extra_forbidden":
        parent = param.rpartition(".")[0]
        return f"{source}: unknown key '{param}' (known: {', '.join(known.get(parent, []))})"
    if first["type"] == "missing":
        return f"{source}: missing key '{param}'"
    msgs = []
    for e in errors:
        m = e["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
        for long, short in _PLAIN.items():
            m = m.replace(long, short)
        if m not in msgs:
            msgs.append(m)
    return f"{source}: {param} = {first['input']!r}: expected {' or '.join(msgs)}"


def refuse(
    exc: ValidationError, known: dict[str, list[str]], prefix: str = "", source: str = "params"
) -> FscsError:
    """A ValidationError as one FscsError line, one clause per param at fault (``known``: section path ->
    its keys, for the unknown-key message)."""
    by_param: dict[str, list[dict[str, Any]]] = {}
    for error in exc.errors():
        by_param.setdefault(prefix + _param(error), []).append(error)
    return FscsError("; ".join(_describe(p, es, known, source) for p, es in by_param.items()))
