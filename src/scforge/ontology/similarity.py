"""scCello's cell-type relations: personalised PageRank on the Cell Ontology graph, the transformed
similarity levels, and the ancestor mask.

Graph: undirected, one node per current CL term that has a direct-parent link, one edge per
``(child, parent)`` link (``is_a`` and ``part_of``). PPR from ``u`` is exactly
``networkx.pagerank(G, alpha=0.9, personalization=onehot(u))`` (same start, update and stopping
rule), computed for many sources at once with sparse power iteration. Levels:
``sim(u, v) = 1 if PPR_u(v) < 1e-4 else floor(log2(PPR_u(v) * 1e4 + 1))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scforge.errors import ConfigError, InputDataError
from scforge.ontology.cell_ontology import CellOntology

__all__ = [
    "CellTypeRelations", "OntologyGraph", "cell_type_relations", "ontology_graph", "personalized_pagerank",
    "similarity_levels",
]


@dataclass(frozen=True)
class OntologyGraph:
    """Nodes (CL ids, sorted) and the symmetric 0/1 adjacency matrix of the undirected graph."""

    nodes: list[str]
    adjacency: sp.csr_matrix

    def index(self, term_ids: Sequence[str]) -> np.ndarray:
        """Node positions of ``term_ids``; raises listing ids that are not nodes."""
        position = {n: i for i, n in enumerate(self.nodes)}
        missing = [t for t in term_ids if t not in position]
        if missing:
            raise InputDataError(f"{len(missing)} cell type id(s) are not nodes of the ontology graph: {missing[:10]}. "
                                 "They are unknown, deprecated or have no parent/child link in this CL release.")
        return np.array([position[t] for t in term_ids], dtype=np.int64)

    def to_networkx(self):
        """The same graph as a ``networkx.Graph`` (for checks and plots)."""
        import networkx as nx

        graph = nx.Graph()
        graph.add_nodes_from(self.nodes)
        rows, cols = sp.triu(self.adjacency, k=1).nonzero()
        graph.add_edges_from((self.nodes[i], self.nodes[j]) for i, j in zip(rows, cols))
        return graph


def ontology_graph(ontology: CellOntology) -> OntologyGraph:
    """scCello's undirected graph of direct-parent links among current CL terms."""
    edges = ontology.edges()
    nodes = sorted({t for edge in edges for t in edge})
    position = {n: i for i, n in enumerate(nodes)}
    rows = np.array([position[c] for c, _ in edges] + [position[p] for _, p in edges], dtype=np.int64)
    cols = np.array([position[p] for _, p in edges] + [position[c] for c, _ in edges], dtype=np.int64)
    adjacency = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(len(nodes), len(nodes)))
    adjacency.data[:] = 1.0  # duplicate links (is_a and part_of to the same parent) are one edge
    return OntologyGraph(nodes=nodes, adjacency=adjacency)


def personalized_pagerank(adjacency: sp.spmatrix, sources: Sequence[int] | np.ndarray, *, alpha: float = 0.9,
                          tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
    """PPR vectors ``[len(sources), n_nodes]``, row ``k`` personalised on node ``sources[k]``.

    Same power iteration as ``networkx.pagerank`` (uniform start, dangling mass to the
    personalisation node, stop when the L1 change < ``n_nodes * tol``), each source frozen at its
    own stopping step, so results equal networkx's to floating-point rounding.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    n = a.shape[0]
    src = np.asarray(sources, dtype=np.int64)
    if src.size and (src.min() < 0 or src.max() >= n):
        raise ConfigError(f"source indices must be in [0, {n}), got {src.min()}..{src.max()}")
    degree = np.asarray(a.sum(axis=1)).ravel()
    inv = np.divide(1.0, degree, out=np.zeros(n), where=degree != 0)
    transition = sp.diags(inv) @ a  # row-stochastic except dangling rows
    transition_t = sp.csr_matrix(transition.T)
    dangling = degree == 0
    x = np.full((src.size, n), 1.0 / n)
    rows = np.arange(src.size)
    active = np.ones(src.size, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        last = x[idx]
        new = alpha * np.asarray(transition_t @ last.T).T
        new[np.arange(idx.size), src[idx]] += alpha * last[:, dangling].sum(axis=1) + (1 - alpha)
        x[idx] = new
        err = np.abs(new - last).sum(axis=1)
        active[idx[err < n * tol]] = False
    if active.any():
        raise ConfigError(f"personalised PageRank did not converge in {max_iter} iterations for "
                          f"{int(active.sum())} sources (rows {rows[active][:5].tolist()}); raise max_iter.")
    return x


def similarity_levels(ppr: np.ndarray) -> np.ndarray:
    """scCello's integer levels: 1 where PPR < 1e-4, else ``floor(log2(PPR * 1e4 + 1))``."""
    ppr = np.asarray(ppr, dtype=np.float64)
    levels = np.floor(np.log2(ppr * 1e4 + 1)).astype(np.int64)
    levels[ppr < 1e-4] = 1
    return levels


@dataclass(frozen=True)
class CellTypeRelations:
    """Relations among the cell types ``ids`` (in that order).

    ``ppr[a, b]``: PPR from type ``a`` at type ``b``; ``levels``: the transformed similarity levels;
    ``ancestor[a, b]``: type ``b`` is an ontology ancestor of type ``a`` (never on the diagonal).
    """

    ids: list[str]
    ppr: np.ndarray
    levels: np.ndarray
    ancestor: np.ndarray

    def index(self, term_ids: Sequence[str]) -> np.ndarray:
        position = {t: i for i, t in enumerate(self.ids)}
        missing = sorted({t for t in term_ids if t not in position})
        if missing:
            raise InputDataError(f"cell type ids {missing[:10]} are not among the {len(self.ids)} types of these "
                                 "relations; build them with every type you use.")
        return np.array([position[t] for t in term_ids], dtype=np.int64)


def cell_type_relations(ontology: CellOntology, cell_type_ids: Sequence[str], *, alpha: float = 0.9,
                        graph: OntologyGraph | None = None) -> CellTypeRelations:
    """PPR, similarity levels and ancestor mask restricted to ``cell_type_ids`` (order kept).

    PPR runs on the whole ontology graph; only the rows and columns of the given types are kept.
    """
    ids = list(cell_type_ids)
    if len(set(ids)) != len(ids):
        raise ConfigError("cell_type_ids has duplicates; give each CL id once.")
    graph = graph or ontology_graph(ontology)
    nodes = graph.index(ids)
    ppr = personalized_pagerank(graph.adjacency, nodes, alpha=alpha)[:, nodes]
    ancestor = np.array([[b in ontology.ancestors(a) for b in ids] for a in ids], dtype=bool)
    return CellTypeRelations(ids=ids, ppr=ppr, levels=similarity_levels(ppr), ancestor=ancestor)
