"""Reading a recipe's YAML: plain data, the line where each value is written, and limits.

PyYAML's safe loader composes the node graph; `_Builder` turns it into plain Python data, expanding
aliases (counted, and refused past MAX_VALUES), applying merge keys (`<<`), refusing tags beyond plain
data and nesting past MAX_DEPTH, and recording each value's line. `huge_ints` finds integers that
torch and numpy cannot hold. The schema refuses non-finite floats (`fields.Section`).
"""

from __future__ import annotations

from typing import Any

import yaml

from peftctl.errors import Problem
from peftctl.recipe.origin import Key, dotted

# Limits on a recipe's YAML. A real recipe is a few hundred values at most, five levels deep; these
# are far beyond that, and low enough that hostile input is refused in well under a second (an
# "alias bomb", 7 levels of 9 aliases in a few hundred bytes, expands to 4.8 million values).
MAX_DEPTH = 64
MAX_VALUES = 100_000
# Top-level keys starting with this are not fields: they hold YAML anchors to reuse (`<<: *name`).
EXTENSION_PREFIX = "x-"

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}
SYNTAX = "YAML syntax error"


class _Refused(Exception):
    """Stops reading YAML at the first limit crossed; carries the one problem to report."""

    def __init__(self, line: int | None, path: Key, message: str):
        super().__init__(message)
        self.line, self.path, self.message = line, path, message


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than MAX_DEPTH while composing (PyYAML's
    composer recurses once per level: 5,000 levels would exhaust Python's stack)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(mark.line + 1, (), f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Builder:
    """Plain Python data from a composed YAML node graph, recording each value's line.

    Aliases are expanded (at most MAX_VALUES values in all, and an alias inside what it names is
    refused), merge keys (`<<: *anchor`, or a list of anchors) are applied with YAML's rules (the
    mapping's own keys win, then earlier merged mappings over later ones), and a merged value keeps
    the line where it is written. Scalars are built by PyYAML's SafeLoader constructors: no tags
    beyond plain data.
    """

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[Key, int] = {}
        self.problems: list[Problem] = []
        self.count = 0
        self.active: set[int] = set()  # the mappings and sequences being built (ids)
        self.loader = yaml.SafeLoader("")

    def problem(self, node: yaml.Node, path: Key, message: str) -> None:
        self.problems.append(Problem(self.source, node.start_mark.line + 1, dotted(path), message))

    def tick(self, node: yaml.Node, path: Key) -> None:
        self.count += 1
        if self.count > MAX_VALUES:
            top = path[:1]
            raise _Refused(
                self.lines.get(top, node.start_mark.line + 1), top,
                f"more than {MAX_VALUES:,} values once YAML aliases are expanded (an alias repeats all "
                "it names); a recipe is far smaller",
            )

    def scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        finally:
            self.loader.recursive_objects.pop(node, None)
            self.loader.deep_construct = False

    def build(self, node: yaml.Node, path: Key, depth: int = 0) -> Any:
        self.lines[path] = node.start_mark.line + 1
        self.tick(node, path)
        if depth > MAX_DEPTH:  # nesting built up through aliases of aliases
            top = path[:1]
            raise _Refused(self.lines.get(top), top, f"nested deeper than {MAX_DEPTH} levels once YAML "
                           "aliases are expanded")
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.scalar(node)
            except yaml.YAMLError as e:
                self.problem(node, path, f"unsupported YAML: {getattr(e, 'problem', None) or e}")
                return None
        if node.tag != _PLAIN_TAGS.get(type(node)):
            self.problem(node, path, f"unsupported YAML tag {node.tag}")
            return None
        if id(node) in self.active:
            self.problem(node, path, "a YAML alias inside the value it names (a recursive alias)")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(n, (*path, i), depth + 1) for i, n in enumerate(node.value)]
            out: dict[str, Any] = {}
            for key, key_node, value_node in self.pairs(node, path):
                out[key] = self.build(value_node, (*path, key), depth + 1)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        finally:
            self.active.discard(id(node))

    def pairs(self, node: yaml.MappingNode, path: Key) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of a mapping, merge keys applied."""
        own: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            self.tick(key_node, path)
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    self.tick(src, path)
                    if not isinstance(src, yaml.MappingNode) or src.tag != _PLAIN_TAGS[yaml.MappingNode]:
                        self.problem(src, path, "a merge key (<<) takes a mapping or a list of mappings")
                    elif id(src) in self.active:
                        self.problem(src, path, "a YAML alias inside the value it names (a recursive alias)")
                    else:
                        self.active.add(id(src))
                        try:
                            for key, kn, vn in self.pairs(src, path):
                                merged.setdefault(key, (kn, vn))  # an earlier mapping wins
                        finally:
                            self.active.discard(id(src))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, path, "a key must be a plain name, not a list or mapping")
                continue
            try:
                key = self.scalar(key_node)
            except yaml.YAMLError as e:
                self.problem(key_node, path, f"unsupported YAML: {getattr(e, 'problem', None) or e}")
                continue
            key = key if isinstance(key, str) else str(key)
            if key in own:
                self.problem(key_node, (*path, key), "duplicate key")
            own[key] = (key_node, value_node)
        merged.update(own)  # the mapping's own keys win over merged ones
        return [(k, kn, vn) for k, (kn, vn) in merged.items()]


def parse_yaml(text: str, source: str) -> tuple[Any, dict[Key, int], list[Problem]]:
    """(data, {dotted key: line}, problems) of one YAML document, within the limits above."""
    builder = _Builder(source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}, []
        data = builder.build(node, ())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        return None, {}, [Problem(source, line, "", f"{SYNTAX}: {e.problem or e.context}")]
    except yaml.YAMLError as e:  # a reader error (a control character), without a line
        return None, {}, [Problem(source, None, "", f"{SYNTAX}: {e}")]
    except _Refused as e:
        return None, {}, [Problem(source, e.line, dotted(e.path), e.message)]
    finally:
        loader.dispose()
        builder.loader.dispose()
    return data, builder.lines, builder.problems


def huge_ints(data: Any, key: Key = ()):
    """(key, value) of every integer beyond int64 anywhere in the data (torch and numpy overflow)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from huge_ints(v, (*key, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from huge_ints(v, (*key, i))
    elif isinstance(data, int) and not isinstance(data, bool) and not -(2**63) <= data < 2**63:
        yield key, data
