"""`farm spec`: every field of a job spec with its default and meaning, from the spec's own docstrings."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from rich.markup import escape
from rich.tree import Tree


def _submodel(annotation) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def spec_tree(model: type[BaseModel], title: str) -> Tree:
    tree = Tree(f"[bold]{title}[/bold]: {model.__doc__ or ''}".strip())
    _add_fields(tree, model)
    return tree


def _add_fields(tree: Tree, model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        sub = _submodel(info.annotation)
        default = "" if info.is_required() else f" = {info.get_default(call_default_factory=True)!r}"
        if sub is not None:
            _add_fields(tree.add(f"[cyan]{name}[/cyan]: {info.description or ''}"), sub)
        else:
            tree.add(f"[cyan]{name}[/cyan]{escape(default)}  {escape(info.description or '')}")
