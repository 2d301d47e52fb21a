"""Highly variable gene selection for tokenizer gene subsets (scGPT's ``subset_hvg`` step)."""

from __future__ import annotations

from typing import Any

from scforge.errors import DependencyError, InputDataError
from scforge.matrix import as_source


def select_hvg(
    adata: Any,
    n_top_genes: int,
    *,
    flavor: str = "seurat_v3",
    layer: str | None = None,
    batch_key: str | None = None,
    gene_col: str | None = None,
) -> list[str]:
    """Names of the ``n_top_genes`` most variable genes, computed on a private copy.

    ``seurat_v3`` (scGPT's choice for raw counts) expects raw counts; ``seurat`` and
    ``cell_ranger`` expect log-normalized data. The caller's AnnData is not modified. Backed
    AnnData must be loaded into memory first (HVG selection needs all cells at once).
    """
    import anndata as ad
    import scanpy as sc

    if getattr(adata, "isbacked", False):
        raise InputDataError(
            "select_hvg needs the expression matrix in memory; the AnnData is backed. Load it with "
            "adata.to_memory() (or compute HVGs on a subsample) and pass the gene list to genes=."
        )
    source = as_source(adata, layer=layer)
    if n_top_genes < 1:
        raise InputDataError(f"n_top_genes must be >= 1, got {n_top_genes}")
    names = source.gene_names(gene_col)
    obs = adata.obs[[batch_key]].copy() if batch_key is not None else None
    work = ad.AnnData(X=source.matrix.copy(), obs=obs)
    work.var_names = names
    work.var_names_make_unique()
    try:
        result = sc.pp.highly_variable_genes(
            work, n_top_genes=n_top_genes, flavor=flavor, batch_key=batch_key, inplace=False
        )
    except ImportError as exc:  # seurat_v3 needs scikit-misc
        raise DependencyError(
            f"HVG flavor {flavor!r} needs an optional package ({exc}). Install scikit-misc, or use "
            "flavor='seurat' / 'cell_ranger' on log-normalized data."
        ) from exc
    except ValueError as exc:
        if "reciprocal condition number" not in str(exc):
            raise
        raise InputDataError(
            f"The {flavor} HVG fit (loess on mean vs variance) failed on {source.where} "
            f"({work.n_obs} cells): {exc!r}. This happens with few cells or mostly-zero genes; use "
            "more cells, filter rare genes first, or flavor='seurat' on log-normalized data."
        ) from exc
    mask = result["highly_variable"].to_numpy()
    return [str(g) for g in names[mask]]
