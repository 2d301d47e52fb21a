"""Build small perturbation files in the exact GEARS ``perturb_processed.h5ad`` layout from real cells.

Cells and genes come from a real dataset (e.g. the ifnb subset: ``layers['lognorm']`` becomes X, the
counts become ``layers['counts']``); each perturbed gene gets a fixed, seeded set of target genes whose
values are scaled in the cells of every condition containing it, so DE rankings are meaningful.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge.data.perturbation import RANKING_KEY, STORED_TOP_KEYS, from_anndata, rank_de_genes, top_de_genes
from scforge.errors import InputDataError

_FAKE_ENSEMBL = 90_000_000_000


def _ensembl_ids(symbols: np.ndarray) -> np.ndarray:
    """Real human Ensembl ids where the symbol maps uniquely, else ``ENSG9...`` placeholders."""
    from scforge.genes import map_symbols_to_ensembl

    mapped = map_symbols_to_ensembl(symbols.tolist(), use_synonyms=False)
    out, used = [], set()
    for i, ens in enumerate(mapped):
        ens = ens if ens is not None and ens not in used else f"ENSG{_FAKE_ENSEMBL + i:011d}"
        used.add(ens)
        out.append(ens)
    return np.array(out, dtype=object)


def _pick_genes(lognorm: Any, symbols: np.ndarray, perturbed: list[str], n_genes: int | None) -> np.ndarray:
    """Positions (sorted) of the perturbed genes plus the most expressed others, ``n_genes`` in all."""
    if n_genes is None:
        return np.arange(symbols.size)
    pert_pos = [int(np.flatnonzero(symbols == g)[0]) for g in perturbed]
    means = np.asarray(lognorm.mean(axis=0)).ravel()
    chosen = set(pert_pos)
    others = [i for i in np.argsort(-means, kind="stable") if i not in chosen]
    return np.sort(np.array(pert_pos + others[:max(0, n_genes - len(pert_pos))], dtype=np.int64))


def _scale_table(conditions: list[str], cond_genes: list[tuple[str, ...]], symbols: np.ndarray,
                 rng: np.random.Generator, n_targets: int) -> np.ndarray:
    """Per-condition multiplicative factors (row 0 = ctrl, all ones): each perturbed gene scales itself
    by 3 and ``n_targets`` seeded targets by 0.3 or 3."""
    effects = {}
    for gene in sorted({g for genes in cond_genes for g in genes}):
        self_pos = int(np.flatnonzero(symbols == gene)[0])
        candidates = np.setdiff1d(np.arange(symbols.size), [self_pos])
        targets = rng.choice(candidates, min(n_targets, candidates.size), replace=False)
        factors = np.ones(symbols.size, dtype=np.float32)
        factors[targets] = rng.choice(np.array([0.3, 3.0], dtype=np.float32), targets.size)
        factors[self_pos] = 3.0
        effects[gene] = factors
    table = np.ones((len(conditions) + 1, symbols.size), dtype=np.float32)
    for i, genes in enumerate(cond_genes, start=1):
        for g in genes:
            table[i] *= effects[g]
    return table


def _scaled(matrix: Any, codes: np.ndarray, table: np.ndarray, rounded: bool) -> sp.csr_matrix:
    out = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    entry_rows = np.repeat(np.arange(out.shape[0]), np.diff(out.indptr))
    out.data *= table[codes[entry_rows], out.indices]
    if rounded:
        out.data = np.rint(out.data)
        out.eliminate_zeros()
    return out


def _gears_uns(adata: Any) -> dict[str, dict[str, np.ndarray]]:
    """The four GEARS DE entries of ``uns``, computed as GEARS does, keyed by condition_name."""
    data = from_anndata(adata, "condition", "ctrl", gene_symbols="gene_name")
    rankings = rank_de_genes(data)
    profiles = data.profiles()
    ctrl = profiles.control_mean(None)
    var = np.asarray(adata.var_names).astype(str)
    uns: dict[str, dict[str, np.ndarray]] = {key: {} for key in (RANKING_KEY, *STORED_TOP_KEYS.values(),
                                                                 "non_dropout_gene_idx", "non_zeros_gene_idx")}
    for group, ranking in rankings.items():
        name = data.uns_keys[group]
        mean = profiles.means[group]
        non_zero = np.flatnonzero(mean != 0)
        uns[RANKING_KEY][name] = var[ranking]
        for kind, key in STORED_TOP_KEYS.items():
            uns[key][name] = var[top_de_genes(ranking, mean, ctrl, n=20, kind=kind)]
        uns["non_zeros_gene_idx"][name] = non_zero
        uns["non_dropout_gene_idx"][name] = np.sort(np.concatenate([non_zero, np.flatnonzero((mean == 0) & (ctrl == 0))]))
    return uns


def gears_layout_adata(source: Any, *, singles: list[str], combos: list[tuple[str, str]], n_ctrl: int,
                       n_per_condition: int, seed: int, cell_type: str = "A549", n_genes: int | None = None,
                       n_targets: int = 30) -> Any:
    """A GEARS-layout AnnData built from ``source`` cells (``layers['lognorm']`` -> X; counts from
    ``layers['counts']`` or X). ``singles`` / ``combos`` are gene symbols of ``source.var_names``;
    ``n_genes`` keeps the perturbed genes plus the most expressed others (None: all)."""
    import anndata as ad

    if "lognorm" not in source.layers:
        raise InputDataError(f"source needs layers['lognorm'] (log-normalised expression); layers: {list(source.layers)}")
    symbols = np.asarray(source.var_names).astype(str)
    conditions = [f"{g}+ctrl" for g in singles] + [f"{a}+{b}" for a, b in combos]
    cond_genes = [(g,) for g in singles] + [tuple(c) for c in combos]
    perturbed = list(dict.fromkeys(g for genes in cond_genes for g in genes))
    absent = [g for g in perturbed if g not in set(symbols)]
    if absent:
        raise InputDataError(f"perturbed genes {absent} are not in source.var_names; pick measured genes")
    rng = np.random.default_rng(seed)
    genes = _pick_genes(source.layers["lognorm"], symbols, perturbed, n_genes)
    n_total = n_ctrl + n_per_condition * len(conditions)
    src_rows = rng.choice(source.n_obs, n_total, replace=n_total > source.n_obs)
    codes = rng.permutation(np.repeat(np.arange(len(conditions) + 1), [n_ctrl] + [n_per_condition] * len(conditions)))
    table = _scale_table(conditions, cond_genes, symbols[genes], rng, n_targets)
    counts = source.layers["counts"] if "counts" in source.layers else source.X
    labels = np.array(["ctrl", *conditions], dtype=object)[codes]
    dose = np.where([len(c.split("+")) == 2 for c in labels], "1+1", "1")
    obs = pd.DataFrame({"condition": labels, "cell_type": cell_type, "dose_val": dose,
                        "control": (dose == "1").astype(int)}, index=[f"cell{i:06d}" for i in range(n_total)])
    obs["condition_name"] = [f"{cell_type}_{c}_{d}" for c, d in zip(labels, dose)]
    obs = obs.astype({k: "category" for k in ("condition", "cell_type", "dose_val", "condition_name")})
    var = pd.DataFrame({"gene_name": symbols[genes]}, index=_ensembl_ids(symbols[genes]))
    adata = ad.AnnData(
        X=_scaled(source.layers["lognorm"][src_rows][:, genes], codes, table, rounded=False), obs=obs, var=var,
        layers={"counts": _scaled(counts[src_rows][:, genes], codes, table, rounded=True)})
    adata.uns.update(_gears_uns(adata))
    return adata
