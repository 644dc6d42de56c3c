"""The Graph IR: a networkx DiGraph with one node per operation and one edge per tensor between two operations.

Node data lives in `Node`: op type, attributes, parameters (float32 numpy arrays), input and output value
names, and where in the YAML the node came from. Graph inputs and outputs are named values; `shapes` maps
every value to its per-sample shape (the batch axis is dynamic). Layout is NCHW, as in ONNX.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from .ops.base import Shape


@dataclass
class Source:
    """Where a node was declared: for error messages that point at the YAML."""

    file: str | None = None
    line: int | None = None
    note: str = ""  # e.g. "in block 'basic' used by 'stage1' at line 40"


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    fillers: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: Source = field(default_factory=Source)


@dataclass
class ValueInfo:
    name: str
    shape: Shape


class GraphError(ValueError):
    """The graph is malformed (a programming error in a pass, not a user error)."""


class Graph:
    def __init__(self, name: str, inputs: list[ValueInfo], meta: dict[str, Any] | None = None):
        self.name = name
        self.inputs = list(inputs)
        self.outputs: list[str] = []
        self.meta: dict[str, Any] = dict(meta or {})
        self.shapes: dict[str, Shape | None] = {v.name: v.shape for v in inputs}
        self.nx = nx.DiGraph()
        self._producer: dict[str, str] = {}
        self._readers: dict[str, set[str]] = {}  # value -> names of nodes that read it
        self._order = 0

    # --- building ---------------------------------------------------------------------------------------
    def add_node(self, node: Node) -> Node:
        if node.name in self.nx:
            raise GraphError(f"node '{node.name}' already exists")
        for value in node.outputs:
            if value in self._producer or value in self.input_names:
                raise GraphError(f"value '{value}' is produced twice")
        self.nx.add_node(node.name, node=node, order=self._order)
        self._order += 1
        for value in node.outputs:
            self._producer[value] = node.name
        for value in node.inputs:
            self._readers.setdefault(value, set()).add(node.name)
            src = self._producer.get(value)
            if src is not None:
                self.nx.add_edge(src, node.name, value=value)
        for value in node.outputs:  # readers added before their producer (passes may do that)
            for reader in self._readers.get(value, ()):
                self.nx.add_edge(node.name, reader, value=value)
        return node

    def remove_node(self, name: str) -> Node:
        node = self.node(name)
        for value in node.outputs:
            self._producer.pop(value, None)
        for value in node.inputs:
            self._readers.get(value, set()).discard(name)
        self.nx.remove_node(name)
        return node

    # --- queries ----------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    def node(self, name: str) -> Node:
        return self.nx.nodes[name]["node"]

    def nodes(self) -> list[Node]:
        """All nodes in a topological order that keeps insertion order where the graph allows."""
        order = nx.lexicographical_topological_sort(self.nx, key=lambda n: self.nx.nodes[n]["order"])
        return [self.node(n) for n in order]

    def producer(self, value: str) -> Node | None:
        name = self._producer.get(value)
        return self.node(name) if name is not None else None

    def consumers(self, value: str) -> list[Node]:
        readers = self._readers.get(value, set())
        return [n for n in self.nodes() if n.name in readers]

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def copy(self) -> Graph:
        return copy.deepcopy(self)

    def check(self) -> None:
        """Raise GraphError unless every input is defined, the graph is acyclic and outputs exist."""
        known = set(self.input_names) | set(self._producer)
        for node in self.nodes():
            for value in node.inputs:
                if value and value not in known:
                    raise GraphError(f"node '{node.name}' reads undefined value '{value}'")
        if not nx.is_directed_acyclic_graph(self.nx):
            raise GraphError("the graph has a cycle")
        for out in self.outputs:
            if out not in known:
                raise GraphError(f"graph output '{out}' is not produced by any node")
