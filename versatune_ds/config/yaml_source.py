"""Reading YAML text for a run config at a bounded cost, with the line of every key.

`load_bounded(text, what, source)` returns (composed node, Python value) of one document and refuses, with a
`UserError` naming `file:line`, what would cost too much:

- more than MAX_CONFIG_BYTES of text;
- nesting deeper than MAX_NESTING, checked on PyYAML's event stream first (its parser is a state machine, but
  its composer and constructor recurse, so a 10 000-deep `[[[...` would otherwise end in a RecursionError);
- more than MAX_VALUES keys and values *after alias expansion*, or a deeper expanded tree, or an alias inside
  its own anchor. An alias is the very node object of its anchor, so the composed document is a graph; its
  expanded size is computed once per node (post-order, iterative) before any Python object is built, so a
  "billion laughs" document (each anchor repeating the previous one 10 times, 10^9 values at 9 levels) is
  refused in milliseconds instead of exhausting memory. The Python value is then constructed from the checked
  node, where PyYAML builds each aliased node once and shares it.

`collect_lines` (dotted key -> line) and `duplicate_keys` walk the graph visiting each node once, so a shared
alias node is not walked again for each of its uses (that walk grew 10x per level of aliases).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from versatune_ds.errors import UserError

MAX_CONFIG_BYTES = 256 * 1024  # a run config is a few KiB; pure-Python YAML reads ~100 KiB/s
MAX_NESTING = 64  # levels of mappings / lists, counted after alias expansion; a run config needs fewer than 10
MAX_VALUES = 100_000  # keys + values after alias expansion; a run config holds a few hundred
# libyaml's parser when PyYAML was built with it (pip wheels are): ~20x faster than the pure-Python one.
_FAST_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BRACKETS = re.compile(r"[\[\]{}]")


def load_bounded(text: str, what: str, source: str | None, *, hint: str = "") -> tuple[yaml.Node | None, Any]:
    """(composed node, Python value) of one YAML document, refusing documents that would cost too much."""
    if len(text) > MAX_CONFIG_BYTES:
        raise UserError(f"{what} is {len(text)} characters long; a run config is refused above {MAX_CONFIG_BYTES} (it needs a few thousand)")
    try:
        node = _compose_bounded(text, what, source)
        # Constructed from the checked node: each aliased node is built once and shared, so this is linear too.
        loaded = None if node is None else yaml.SafeLoader("").construct_document(node)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date-like scalar such as 2020-13-45
        raise UserError(f"{what} is not valid YAML{_yaml_reason(exc, source)}{hint}") from None
    return node, loaded


def _compose_bounded(text: str, what: str, source: str | None) -> yaml.Node | None:
    # 0. Flow brackets first: PyYAML's scanner keeps a possible key per open `[` / `{` on a line and re-checks
    # them all for every token, which makes a long `[[[[...` line cost seconds before any event comes out.
    # Brackets inside quoted text count too; a config with hundreds of unbalanced ones in a string is refused.
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth += 1 if match.group() in "[{" else -1
        if depth > 4 * MAX_NESTING:
            line = text.count("\n", 0, match.start()) + 1
            where = f":{line}" if source else ""
            raise UserError(f"{what}{where} opens more than {4 * MAX_NESTING} flow brackets ([ or {{) without closing them; "
                            f"a run config nests fewer than 10 levels -- flatten it")
    try:
        return _compose_checked(text, what, source, _FAST_LOADER)
    except yaml.YAMLError:
        if _FAST_LOADER is yaml.SafeLoader:
            raise
    # libyaml found a syntax error: parse again in Python, whose messages name the problem the way users know
    # (and which stops at the same place, so this costs no more than the part before the error).
    return _compose_checked(text, what, source, yaml.SafeLoader)


def _compose_checked(text: str, what: str, source: str | None, loader: type) -> yaml.Node | None:
    # 1. Nesting depth on the event stream (the parsers are state machines; PyYAML's composer recurses).
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise UserError(f"{what}{_at(event.start_mark, source)} nests mappings / lists more than {MAX_NESTING} levels deep; "
                                "a run config needs fewer than 10 -- flatten it")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    # 2. The size and depth after alias expansion, before any Python object is built.
    node = yaml.compose(text, Loader=loader)
    if node is not None:
        _check_expanded(node, what, source)
    return node


def _at(mark: Any, source: str | None) -> str:
    return f":{mark.line + 1}" if source else f" (column {mark.column + 1})"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expanded(root: yaml.Node, what: str, source: str | None) -> None:
    """Refuse a document whose alias-expanded tree is too big or too deep, or loops; each node is visited once.

    An alias is the same node object as its anchor, so the composed document is a graph: `size` and `depth`
    of a node are computed once from its children's (post-order, iterative) and reused for every alias of it.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_VALUES:
                raise UserError(
                    f"{what}{_at(node.start_mark, source)} expands to more than {MAX_VALUES} values through YAML aliases "
                    "(&anchor ... *anchor); a run config holds a few hundred -- write the values out instead of nesting aliases"
                )
            if depth[key] > MAX_NESTING:
                raise UserError(f"{what}{_at(node.start_mark, source)} nests mappings / lists more than {MAX_NESTING} levels deep "
                                "through YAML aliases; a run config needs fewer than 10 -- flatten it")
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in on_path:
                raise UserError(f"{what}{_at(kid.start_mark, source)}: a YAML alias refers to a mapping or list that contains it, "
                                "a structure without end; write the value out")
            if id(kid) not in size:
                stack.append((kid, False))


def _yaml_reason(exc: Exception, source: str | None) -> str:
    """`: <file>:<line>:<column>: <what>` from a YAML error, without PyYAML's multi-line source excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}: " if source else f"column {mark.column + 1}: "
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        return f": {where}{what}"
    return f": {exc}"


def collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int], seen: set[int] | None = None) -> None:
    """Map dotted key paths to 1-based YAML line numbers, so errors can point at `file:line`.

    Each node is walked once (`seen`): the keys under an alias's second use get no line of their own and errors
    there point at the nearest key that has one (the alias). Depth is bounded by `_check_expanded`.
    """
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            collect_lines(value_node, key, lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            key = f"{prefix}[{index}]"
            lines[key] = child.start_mark.line + 1
            collect_lines(child, key, lines, seen)


def duplicate_keys(node: yaml.Node, prefix: str, seen: set[int] | None = None) -> list[tuple[str, int, int]]:
    """(dotted key, first line, second line) for every key written twice in the same YAML mapping (each node once)."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return []
    seen.add(id(node))
    found: list[tuple[str, int, int]] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key in first_line:
                found.append((key, first_line[key], line))
            first_line.setdefault(key, line)
            found.extend(duplicate_keys(value_node, key, seen))
    elif isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            found.extend(duplicate_keys(child, f"{prefix}[{index}]", seen))
    return found
