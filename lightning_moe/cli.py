"""``key=value`` command lines for the small commands (translate, evaluate), typed and strict."""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Optional, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

__all__ = ["parse_args"]


def parse_args(schema: type[T], argv: Optional[Sequence[str]], usage: str) -> T:
    """Merge ``key=value`` arguments into dataclass ``schema`` (unknown keys and bad types are errors).

    ``--help`` prints ``usage`` and every field with its default.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(usage)
        for f in fields(schema):
            print(f"  {f.name}={f.default!r}")
        raise SystemExit(0)
    bad = [a for a in args if "=" not in a]
    if bad:
        raise SystemExit(f"error: arguments must be key=value, got {bad}\n{usage}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(args))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        valid = ", ".join(f.name for f in fields(schema))
        raise SystemExit(f"error: {err}\nvalid keys: {valid}") from None
