"""Task registry: ``@register_task(name)`` on a :class:`~lightning_moe.tasks.base.Task` subclass, and
``build_task(name, **options)`` to build one from plain options (a Hydra/YAML mapping).

``build_task("foo")`` for a name not yet registered imports ``lightning_moe.tasks.foo`` first, so adding a
task takes one module (plus its config entry) and no edit here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from lightning_moe.tasks.base import Task

__all__ = ["register_task", "build_task", "build_task_config", "get_task_class", "available_tasks"]

_TASKS: dict[str, type[Task]] = {}
T = TypeVar("T", bound=type)


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator registering a :class:`Task` subclass under ``name``.

    Raises:
        ValueError: an empty name, a class that is not a Task with a dataclass ``config_class``, or a name
            already taken by another class.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name={name!r} is invalid: use a Python identifier such as 'translation'")

    def decorate(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"@register_task({name!r}) decorates {cls!r}: it must be a subclass of Task")
        config_class = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
            raise ValueError(f"{cls.__name__}.config_class must be a dataclass of the task's options")
        previous = _TASKS.get(name)
        if previous is not None and previous.__qualname__ != cls.__qualname__:
            raise ValueError(f"task name {name!r} is already registered by {previous.__qualname__}: pick another name")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorate


def available_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_TASKS)


def get_task_class(name: str) -> type[Task]:
    """The class registered as ``name``, importing ``lightning_moe.tasks.<name>`` if needed."""
    if name not in _TASKS and isinstance(name, str) and name.isidentifier():
        try:
            importlib.import_module(f"lightning_moe.tasks.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"lightning_moe.tasks.{name}":
                raise
    if name not in _TASKS:
        raise ValueError(f"task {name!r} is not registered: use one of {available_tasks()}")
    return _TASKS[name]


def build_task_config(name: str, **options: Any) -> Any:
    """The validated config dataclass of task ``name`` from keyword options."""
    cls = get_task_class(name)
    config_class = cls.config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"task {name!r} has no options {unknown}: valid options are {sorted(known)}")
    return config_class(**options)


def build_task(name: str, **options: Any) -> Task:
    """Build task ``name`` from its options, e.g. ``build_task("translation", src_lang="en", tgt_lang="de")``."""
    return get_task_class(name)(build_task_config(name, **options))
