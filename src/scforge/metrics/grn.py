"""Validation of gene networks: GO gene sets, program enrichment and recovery of known gene sets.

* :func:`go_gene_sets` reads the offline org.Hs.eg.db / GO.db tables (``../shared/data/genes/go``) and
  propagates each gene's direct annotations to every ancestor term (``is_a`` and ``part_of``: GO's
  true-path rule).
* :func:`program_enrichment`: one-sided hypergeometric test per (program, term) within a gene
  universe, ``P(X >= k) = hypergeom.sf(k - 1, M, n, N)``, Benjamini-Hochberg FDR over all tests.
* :func:`interferon_genes` and :func:`gene_set_recovery`: how well a network's weighted degree ranks a
  known gene set (e.g. type I interferon response genes) first: AUROC and precision at k.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from scforge.errors import ConfigError, InputDataError

__all__ = ["go_gene_sets", "go_descendants", "go_term_names", "interferon_genes", "program_enrichment",
           "best_terms", "n_enriched_programs", "gene_set_recovery", "IFN_TERMS"]

PARENTS_FILE = "go_parents_GOdb_2022-07.tsv.gz"
PROPAGATE_RELATIONS = ("isa", "part of")
#: "response to type I interferon" and "type I interferon signaling pathway"
IFN_TERMS = ("GO:0034340", "GO:0060337")
ASPECTS = ("BP", "MF", "CC")


def _folder(go_dir: str | os.PathLike) -> str:
    from scforge.genes.text import _go_folder

    return _go_folder(go_dir)


@functools.lru_cache(maxsize=4)
def _parents(folder: str) -> dict[str, tuple[str, ...]]:
    from scforge.genes.text import _read_table

    table = _read_table(folder, PARENTS_FILE, ["go_id", "parent_go_id", "relationship"])
    table = table[table["relationship"].isin(PROPAGATE_RELATIONS)]
    return {t: tuple(p) for t, p in table.groupby("go_id", sort=False)["parent_go_id"]}


@functools.lru_cache(maxsize=4)
def _annotations(folder: str) -> pd.DataFrame:
    from scforge.genes.text import ANNOTATIONS_FILE, _read_table

    ann = _read_table(folder, ANNOTATIONS_FILE, ["symbol", "go_id", "evidence", "aspect"])
    return ann[ann["evidence"] != "ND"].drop_duplicates(["symbol", "go_id"])[["symbol", "go_id", "aspect"]]


def go_term_names(go_dir: str | os.PathLike) -> dict[str, str]:
    """GO id -> term name (GO.db 2022-07)."""
    from scforge.genes.text import TERMS_FILE, _read_table

    terms = _read_table(_folder(go_dir), TERMS_FILE, ["go_id", "term"])
    return dict(zip(terms["go_id"], terms["term"]))


def _ancestors(term: str, parents: Mapping[str, tuple[str, ...]], memo: dict[str, frozenset]) -> frozenset:
    if term in memo:
        return memo[term]
    out = {term}
    stack = list(parents.get(term, ()))
    while stack:  # iterative: deep GO paths stay clear of the recursion limit
        t = stack.pop()
        if t in out:
            continue
        if t in memo:
            out |= memo[t]
            continue
        out.add(t)
        stack.extend(parents.get(t, ()))
    memo[term] = frozenset(out)
    return memo[term]


def go_gene_sets(go_dir: str | os.PathLike, aspect: str = "BP", *, min_size: int = 5, max_size: int = 500,
                 universe: Iterable[str] | None = None, propagate: bool = True) -> dict[str, frozenset[str]]:
    """GO id -> gene symbols annotated to it or (``propagate``) to any of its descendants.

    Only ``aspect`` (BP, MF or CC) terms; annotations with evidence ND are dropped. With ``universe``
    the sets are restricted to it first; sets outside ``min_size .. max_size`` genes are dropped."""
    if aspect not in ASPECTS:
        raise ConfigError(f"aspect={aspect!r}; choose one of {ASPECTS}.")
    if not 1 <= min_size <= max_size:
        raise ConfigError(f"need 1 <= min_size <= max_size, got {min_size} and {max_size}.")
    folder = _folder(go_dir)
    ann = _annotations(folder)
    ann = ann[ann["aspect"] == aspect]
    if universe is not None:
        ann = ann[ann["symbol"].isin(set(map(str, universe)))]
    sets: dict[str, set[str]] = {}
    parents = _parents(folder) if propagate else {}
    memo: dict[str, frozenset] = {}
    for term, genes in ann.groupby("go_id", sort=True)["symbol"]:
        for t in _ancestors(term, parents, memo) if propagate else (term,):
            sets.setdefault(t, set()).update(genes)
    return {t: frozenset(g) for t, g in sorted(sets.items()) if min_size <= len(g) <= max_size}


def go_descendants(go_dir: str | os.PathLike, terms: Iterable[str]) -> set[str]:
    """The given GO terms and all their descendants (through ``is_a`` and ``part_of``)."""
    children: dict[str, list[str]] = {}
    for child, parents in _parents(_folder(go_dir)).items():
        for p in parents:
            children.setdefault(p, []).append(child)
    out: set[str] = set()
    stack = [str(t) for t in terms]
    while stack:
        t = stack.pop()
        if t not in out:
            out.add(t)
            stack.extend(children.get(t, ()))
    return out


def interferon_genes(go_dir: str | os.PathLike, *, terms: Sequence[str] = IFN_TERMS,
                     universe: Iterable[str] | None = None) -> frozenset[str]:
    """Genes annotated to type I interferon response / signalling (``terms``) or any descendant term."""
    wanted = go_descendants(go_dir, terms)
    ann = _annotations(_folder(go_dir))
    genes = set(ann.loc[ann["go_id"].isin(wanted), "symbol"])
    if universe is not None:
        genes &= set(map(str, universe))
    return frozenset(genes)


def program_enrichment(programs: pd.DataFrame | Mapping[Any, Iterable[str]], gene_sets: Mapping[str, Iterable[str]],
                       universe: Iterable[str], *, term_names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Hypergeometric over-representation of every gene set in every program.

    Programs and sets are restricted to ``universe`` (M genes). For a program of N genes, a set of
    n genes and k shared genes, ``p = hypergeom.sf(k - 1, M, n, N)``; FDR is Benjamini-Hochberg over
    all (program, set) pairs tested (sets with no gene in the universe are not tested). Returns the
    pairs with k >= 1, sorted by program then p: ``program, term, name, program_size, term_size,
    overlap, expected, fold, p_value, fdr, genes``."""
    from scipy.stats import false_discovery_control, hypergeom

    from scforge.data.network import programs_as_dict

    u = set(map(str, universe))
    if not u:
        raise InputDataError("the gene universe is empty.")
    progs = {p: sorted(set(g) & u) for p, g in programs_as_dict(programs).items()}
    progs = {p: g for p, g in progs.items() if g}
    sets = {str(t): frozenset(map(str, g)) & u for t, g in gene_sets.items()}
    sets = {t: g for t, g in sets.items() if g}
    if not progs or not sets:
        raise InputDataError(f"nothing to test: {len(progs)} programs and {len(sets)} gene sets share genes with "
                             "the universe. Use the network's genes as the universe and the same gene names.")
    m = len(u)
    terms = list(sets)
    term_sizes = np.array([len(sets[t]) for t in terms])
    rows = []
    pvals = []
    for p, genes in progs.items():
        gs = set(genes)
        overlap = np.array([len(gs & sets[t]) for t in terms])
        pv = hypergeom.sf(overlap - 1, m, term_sizes, len(genes))
        pvals.append(np.where(overlap > 0, pv, 1.0))
        rows.append(pd.DataFrame({"program": p, "term": terms, "program_size": len(genes), "term_size": term_sizes,
                                  "overlap": overlap}))
    table = pd.concat(rows, ignore_index=True)
    table["p_value"] = np.clip(np.concatenate(pvals), 0.0, 1.0)
    table["fdr"] = false_discovery_control(table["p_value"].to_numpy(), method="bh")
    table["expected"] = table["program_size"] * table["term_size"] / m
    table["fold"] = table["overlap"] / table["expected"]
    table = table[table["overlap"] > 0].copy()
    names = term_names or {}
    table["name"] = table["term"].map(lambda t: names.get(t, ""))
    table["genes"] = [",".join(sorted(set(progs[p]) & sets[t])) for p, t in zip(table["program"], table["term"])]
    table = table.sort_values(["program", "p_value", "term"], kind="stable").reset_index(drop=True)
    return table[["program", "term", "name", "program_size", "term_size", "overlap", "expected", "fold", "p_value",
                  "fdr", "genes"]]


def best_terms(enrichment: pd.DataFrame) -> pd.DataFrame:
    """The lowest-p term of each program (one row per program with any overlap)."""
    return enrichment.sort_values(["program", "p_value"], kind="stable").groupby("program", sort=True).head(1) \
        .reset_index(drop=True)


def n_enriched_programs(enrichment: pd.DataFrame, fdr: float = 0.05) -> int:
    """Number of programs with at least one term at FDR < ``fdr``."""
    return int(enrichment.loc[enrichment["fdr"] < fdr, "program"].nunique())


def gene_set_recovery(scores: pd.Series, positives: Iterable[str], *, k: int | None = None) -> dict[str, float]:
    """How well ``scores`` (gene -> score, higher = more central) rank the ``positives`` first: AUROC
    (ties count half), precision at ``k`` (default: the number of positives among the scored genes)
    and the base rate. Only scored genes count."""
    from scipy.stats import rankdata

    s = pd.Series(scores, dtype=np.float64)
    if s.isna().any():
        raise InputDataError("scores hold NaN values.")
    label = s.index.astype(str).isin(set(map(str, positives)))
    n_pos, n = int(label.sum()), int(label.size)
    if n_pos == 0 or n_pos == n:
        raise InputDataError(f"{n_pos} of the {n} scored genes are positives; AUROC needs both kinds.")
    ranks = rankdata(s.to_numpy())
    auroc = (ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
    k = n_pos if k is None else int(k)
    if not 1 <= k <= n:
        raise ConfigError(f"k must be in 1..{n}, got {k}")
    top = np.argsort(-s.to_numpy(), kind="stable")[:k]
    return {"auroc": float(auroc), "precision_at_k": float(label[top].mean()), "k": k, "n_positives": n_pos,
            "n_genes": n, "base_rate": n_pos / n}
