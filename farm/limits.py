"""Bounds on what untrusted input may look like, checked before anything else reads it.

Specs and dataset lines come from people and, over the API, from anyone holding a token. These bounds keep a
hostile input from costing more than it is worth: nesting depth (deep JSON or YAML otherwise ends in a
RecursionError, a 500 or a traceback), integer size, NUL characters (they reach the catalog and file names), YAML
aliases (a "billion laughs" expands a few hundred bytes into gigabytes), and the length of any excerpt of the
input quoted back in a message.
"""

from __future__ import annotations

import yaml

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings accepted in a spec or a dataset line."""
MAX_INT_DIGITS = 30
"""Longest integer (in decimal digits) accepted in a spec; dataset lines may hold longer ones as text only."""
MAX_YAML_ALIASES = 100
"""YAML alias uses (`*name`) per document."""
MAX_YAML_NODES = 100_000
"""Nodes of a YAML document once its aliases are expanded."""
EXCERPT_CHARS = 80
"""At most this many characters of an input are quoted back in an error message."""
MAX_MESSAGE_CHARS = 4000
"""An error message (several lines, each naming a field) is cut at this length."""


class InputTooComplex(ValueError):
    """The input breaks one of the bounds above; the message says which and where."""


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """repr() of `value`, cut to `limit` characters with the original length said, for messages."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def bound_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message`, cut at `limit` characters (and said so)."""
    if len(message) <= limit:
        return message
    return message[:limit] + f"\n... (message cut at {limit} characters)"


def check_structure(data: object, where: str = "", *, max_depth: int = MAX_DEPTH,
                    max_int_digits: int | None = MAX_INT_DIGITS, allow_nul: bool = False) -> None:
    """Walk parsed JSON/YAML data without recursion; raise InputTooComplex naming the first offending place.

    Refused: nesting deeper than `max_depth`, integers longer than `max_int_digits` digits (None: any), and NUL
    characters in strings or keys (unless `allow_nul`).
    """
    stack: list[tuple[object, str, int]] = [(data, where, 0)]
    while stack:
        value, path, depth = stack.pop()
        path = path if len(path) <= EXCERPT_CHARS else "..." + path[-EXCERPT_CHARS:]
        if isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise InputTooComplex(f"{path or '(top level)'}: nested more than {max_depth} levels deep; "
                                      "flatten the data")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not allow_nul and "\x00" in key:
                    raise InputTooComplex(f"{path or '(top level)'}: key {excerpt(key)} holds a NUL character")
                child = f"{path}[{key}]" if isinstance(value, list) else (f"{path}.{key}" if path else str(key))
                stack.append((item, child, depth + 1))
        elif isinstance(value, str):
            if not allow_nul and "\x00" in value:
                raise InputTooComplex(f"{path or '(top level)'}: holds a NUL character (\\x00); remove it")
        elif isinstance(value, int) and not isinstance(value, bool) and max_int_digits is not None:
            if value.bit_length() > max_int_digits * 3.33:
                raise InputTooComplex(f"{path or '(top level)'}: number too large (more than {max_int_digits} "
                                      "digits)")


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with a budget: at most MAX_YAML_ALIASES aliases, MAX_YAML_NODES nodes once aliases are
    expanded, and MAX_DEPTH levels of nesting. Over budget raises yaml.YAMLError (InputTooComplex's message)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._sizes: dict[int, int] = {}
        self._nodes: list = []  # keeps every node alive, so the ids in _sizes stay unique

    def compose_document(self):
        self._aliases, self._depth, self._sizes, self._nodes = 0, 0, {}, []
        return super().compose_document()

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _too_complex(f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out",
                                   self.peek_event().start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _too_complex(f"nested more than {MAX_DEPTH} levels deep; flatten the data",
                               self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._sizes.get(id(node))
        if size is None:
            size = 1
            if isinstance(node, yaml.SequenceNode):
                size += sum(self._sizes.get(id(child), 1) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size += sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            self._sizes[id(node)] = size
            self._nodes.append(node)
        if size > MAX_YAML_NODES:
            raise _too_complex(f"expands to more than {MAX_YAML_NODES} values (aliases of aliases?); write a "
                               "smaller document", node.start_mark)
        return node


def _too_complex(problem: str, mark) -> yaml.YAMLError:
    return yaml.MarkedYAMLError(problem=problem, problem_mark=mark)


def load_yaml(text: str | bytes) -> object:
    """yaml.safe_load under the budget of BoundedSafeLoader and check_structure.

    Raises yaml.YAMLError for bad or over-budget YAML and InputTooComplex for data over the bounds (deep, NUL,
    huge numbers); both carry messages that quote no more than an excerpt of the input.
    """
    try:
        data = yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise InputTooComplex(f"nested more than {MAX_DEPTH} levels deep; flatten the data") from None
    except ValueError as exc:  # int('<5000 digits>'): Python's integer string conversion limit
        raise InputTooComplex(f"a value could not be read ({bound_message(str(exc), 200)})") from None
    check_structure(data)
    return data


def load_json(text: str | bytes) -> object:
    """json.loads bounded like load_yaml: ValueError (with a short message) for bad or over-bound JSON."""
    import json

    try:
        data = json.loads(text)
    except RecursionError:
        raise InputTooComplex(f"nested more than {MAX_DEPTH} levels deep; flatten the data") from None
    check_structure(data)
    return data
