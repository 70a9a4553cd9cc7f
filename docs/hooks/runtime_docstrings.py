"""Griffe extension for the API reference: a class whose docstring is assembled at import (``__doc__ = "..." + X``,
as the DataModules share their common arguments) gets its runtime ``__doc__``, which static analysis cannot read."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe


class RuntimeDocstrings(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if cls.docstring is not None or "__doc__" not in cls.members:
            return
        runtime = getattr(importlib.import_module(cls.module.path), cls.name)
        cls.docstring = griffe.Docstring(inspect.cleandoc(runtime.__doc__), parent=cls)
        del cls.members["__doc__"]  # not an attribute to list
