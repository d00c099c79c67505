"""``key=value`` command lines for the small commands (translate, evaluate): typed and strict parsing,
one-line errors and progress bars on stderr."""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any, NoReturn, TextIO, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

__all__ = ["parse_args", "fail", "one_line", "field_docs", "help_text", "is_terminal", "progress_bar"]


def one_line(message: object) -> str:
    """``message`` as a single line: its first non-empty line (OmegaConf and torch add detail lines)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else str(message).strip()


def fail(message: object) -> NoReturn:
    """Stop the command: ``error: <message>`` as one line on stderr, exit status 1 (no traceback)."""
    raise SystemExit(f"error: {one_line(message)}")


def field_docs(schema: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``schema`` (the string literal after the field), by name.

    Python keeps no such docstrings at run time, so they are read from the class source; a class whose
    source is unavailable gives an empty dict.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(schema)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return "???"


def _show(value: Any) -> str:
    """A default as it is written on the command line (``null``, ``true``, ``[a,b]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _option_lines(schema: type, prefix: str = "") -> list[tuple[str, str]]:
    docs = field_docs(schema)
    rows = []
    for f in fields(schema):
        value = _default(f)
        if is_dataclass(value):
            rows.extend(_option_lines(type(value), f"{prefix}{f.name}."))
            continue
        rows.append((f"{prefix}{f.name}={_show(value)}", docs.get(f.name, "")))
    return rows


def help_text(schema: type, usage: str) -> str:
    """``usage``, then every option as ``key=default`` with its field docstring."""
    rows = _option_lines(schema)
    width = max(len(key) for key, _ in rows) + 2
    lines = [usage, "", "options (key=value; shown with their defaults):"]
    lines += [f"  {key:<{width}}{doc}".rstrip() for key, doc in rows]
    return "\n".join(lines)


def parse_args(schema: type[T], argv: Sequence[str] | None, usage: str) -> T:
    """Merge ``key=value`` arguments into dataclass ``schema`` (unknown keys and bad types are errors).

    ``--help`` prints ``usage`` and every field with its default and docstring, then exits.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(help_text(schema, usage))
        raise SystemExit(0)
    bad = [a for a in args if "=" not in a]
    if bad:
        fail(f"arguments must be key=value, got {bad} (see --help)")
    valid = ", ".join(key.split("=")[0] for key, _ in _option_lines(schema))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(args))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError, TypeError, yaml.YAMLError) as err:  # values are parsed as YAML
        fail(f"{one_line(err)} (valid keys: {valid})")


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "sent") -> Any:
    """A tqdm bar on stderr counting ``unit``s up to ``total``; a no-op bar when not ``enabled``.

    tqdm comes with Lightning. Leaves no line behind, so stdout and the final report stay clean.
    """
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True
    )
