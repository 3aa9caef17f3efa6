"""Fold a graph's nodes into the boxes of its picture, one group at a time, never making a cycle.

:class:`Folder` merges a group of units (a rewritten layer's ops and helpers, a submodule's
plain ops) into one and keeps ``pos`` a topological order while doing so, so the check that a
fold is safe (no path leaves the group and comes back) only walks the group's own span.
:func:`fold_modules` decides which groups to try; :mod:`bitcompile.inspect.render` draws the result.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict
from collections.abc import Callable


@dataclasses.dataclass
class Unit:
    """A box before styling: one node, a folded rewrite (op + helpers) or a folded module."""

    name: str
    role: str
    label: str
    sub: str
    title: str
    module: str
    layer: str
    shape: str
    members: list[str]
    pos: int
    inputs: list[str] = dataclasses.field(default_factory=list)


def toposort(units: dict[str, Unit]) -> list[Unit]:
    """Kahn's algorithm, ties broken by original position (the folds keep the graph acyclic)."""
    indegree = {name: len(u.inputs) for name, u in units.items()}
    users: dict[str, list[str]] = defaultdict(list)
    for u in units.values():
        for a in u.inputs:
            users[a].append(u.name)
    ready = [(u.pos, u.name) for u in units.values() if indegree[u.name] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, name = heapq.heappop(ready)
        out.append(units[name])
        for user in users[name]:
            indegree[user] -= 1
            if indegree[user] == 0:
                heapq.heappush(ready, (units[user].pos, user))
    assert len(out) == len(units), "folding made the graph cyclic"
    return out


def link(units: dict[str, Unit], alias: dict[str, str], by_name: dict) -> None:
    """(Re)compute each unit's input units from its members' inputs."""
    for u in units.values():
        inputs: list[str] = []
        for member in u.members:
            for a in by_name[member].inputs:
                head = alias.get(a)
                if head is not None and head != u.name and head not in inputs:
                    inputs.append(head)
        u.inputs = inputs


class Folder:
    """Folds groups of units into one box, one group at a time, keeping the graph a DAG.

    ``pos`` stays a topological order through every fold (positions may have gaps), so
    the cycle check can stop at the group's last position. Each fold updates the inputs of
    the units around it: a check after it sees the graph as it now is.
    """

    def __init__(self, units: dict[str, Unit]) -> None:
        self.units = units
        self.users: dict[str, set[str]] = defaultdict(set)
        for u in units.values():
            for a in u.inputs:
                self.users[a].add(u.name)
        self.at = {u.pos: u.name for u in units.values()}

    def _after(self, group: set[str], limit: int) -> set[str] | None:
        """Units up to ``limit`` reachable from ``group``; None if a path leaves it and comes back."""
        frontier = [v for g in group for v in self.users[g] if v not in group]
        seen: set[str] = set()
        while frontier:
            v = frontier.pop()
            if v in seen or self.units[v].pos > limit:
                continue
            seen.add(v)
            for w in self.users[v]:
                if w in group:
                    return None
                frontier.append(w)
        return seen

    def fold(self, members: list[str], make: Callable[[list[Unit]], Unit]) -> Unit | None:
        """Replace ``members`` by ``make(their units in order)`` unless that would make a cycle."""
        group = set(members)
        units = [self.units[m] for m in sorted(members, key=lambda m: self.units[m].pos)]
        lo, hi = units[0].pos, units[-1].pos
        after = self._after(group, hi)
        if after is None:
            return None
        folded = make(units)
        folded.inputs = list(dict.fromkeys(a for u in units for a in u.inputs if a not in group))
        # Re-place the span [lo, hi]: what the group reaches goes after the box, the rest
        # (which may feed it) before it; each side keeps its order, so the order stays topological.
        span = [self.at.pop(p) for p in range(lo, hi + 1) if p in self.at]
        before = [n for n in span if n not in group and n not in after]
        later = [n for n in span if n in after]
        for m in members:
            del self.units[m]
        self.units[folded.name] = folded
        for p, name in enumerate([*before, folded.name, *later], start=lo):
            self.units[name].pos = p
            self.at[p] = name
        outside = set().union(*(self.users.pop(m, set()) for m in members)) - group
        for user in outside:
            u = self.units[user]
            u.inputs = list(dict.fromkeys(folded.name if a in group else a for a in u.inputs))
        self.users[folded.name] = outside
        for a in folded.inputs:
            self.users[a] -= group
            self.users[a].add(folded.name)
        return folded


def _enclosing(path: str) -> list[str]:
    """``path`` and the modules around it up to its block: ``l.3.mlp.act`` → ``l.3.mlp.act``, ``l.3.mlp``, ``l.3``."""
    parts = path.split(".")
    out = [path]
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit():
            break
        out.append(".".join(parts[:i]))
    return out


def fold_modules(folder: Folder, alias: dict[str, str], by_name: dict) -> None:
    """Fold the plain ops of one submodule (an RMSNorm's eight ops, an attention's reshapes) into a box.

    Deepest modules first, each with what its submodules left (an MoE's experts with their
    activation); a module that is a candidate layer takes its own ops into the layer's box
    (GPT-2's ``Conv1D`` reshapes). Blocks (``layers.3``) and what holds them are never folded.
    """
    units = folder.units
    module_type = {n.module: n.module_type for n in by_name.values() if n.module and n.module_type}
    inside_of: dict[str, set[str]] = defaultdict(set)  # module -> the units a fold of it may take
    listed_in: dict[str, list[str]] = {}  # unit -> those modules

    def index(u: Unit) -> None:
        if u.role == "plain" and u.module:
            listed_in[u.name] = _enclosing(u.module)
        elif u.role in ("ternary", "skipped") and u.layer:
            listed_in[u.name] = [u.layer]
        for m in listed_in.get(u.name, ()):
            inside_of[m].add(u.name)

    for u in units.values():
        index(u)
    foldable = [m for m in inside_of if not m.split(".")[-1].isdigit()]
    for module in sorted(foldable, key=lambda m: (-m.count("."), m)):
        names = sorted(inside_of[module], key=lambda n: units[n].pos)
        if len(names) < 2:
            continue
        # connected components through direct edges inside the module
        inside = set(names)
        parent = {n: n for n in names}

        def find(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for n in names:
            for a in units[n].inputs:
                if a in inside:
                    parent[find(a)] = find(n)
        groups: dict[str, list[str]] = defaultdict(list)
        for n in names:
            groups[find(n)].append(n)

        def make(members: list[Unit], module: str = module) -> Unit:
            nested = [x for m in members for x in m.members]
            ops = " → ".join(m.label for m in members)
            layer = next((m for m in members if m.role != "plain"), None)
            if layer is not None:  # the layer's box, with its module's own reshapes
                return dataclasses.replace(layer, members=nested, title=f"{layer.title}; in its module: {ops}")
            kind = module_type.get(module) or module.rsplit(".", 1)[-1]
            return Unit(
                members[0].name, "plain", kind, f"{module} · {len(nested)} ops", f"{kind} {module}: {ops}",
                module, "", members[-1].shape, nested, members[0].pos,
            )  # fmt: skip

        for members in groups.values():
            if len(members) < 2 or sum(units[m].role != "plain" for m in members) > 1:
                continue
            folded = folder.fold(members, make)
            if folded is None:
                continue
            for x in folded.members:
                alias[x] = folded.name
            for m in members:
                for listed in listed_in.pop(m, ()):
                    inside_of[listed].discard(m)
            index(folded)
    link(units, alias, by_name)
