"""Gene-embedding networks (scGPT's GRN tutorial): cosine similarity of context-free gene embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from scforge.errors import ConfigError, GeneIdentityError, InputDataError
from scforge.data.network import GeneNetwork

logger = logging.getLogger("scforge")


def gene_embedding_table(source: Any, genes: Sequence[str] | None = None) -> pd.DataFrame:
    """Gene embeddings (one row per gene) from a model with ``gene_embeddings(genes, missing=...)``
    (e.g. :class:`~scforge.models.scgpt.api.ScGPT`) or a DataFrame indexed by gene, restricted to
    ``genes`` in their order; genes without an embedding are dropped and logged."""
    if isinstance(genes, str):
        raise ConfigError(f"genes must be a list of gene names, got the single string {genes!r}.")
    wanted = None if genes is None else list(dict.fromkeys(str(g) for g in genes))
    if isinstance(source, pd.DataFrame):
        table = source.copy()
        table.index = table.index.astype(str)
        if not table.index.is_unique:
            raise InputDataError("the gene embedding table has duplicated gene names in its index.")
        if wanted is not None:
            table = table.loc[[g for g in wanted if g in table.index]]
    elif hasattr(source, "gene_embeddings"):
        table = source.gene_embeddings(wanted, missing="drop") if wanted is not None else source.gene_embeddings()
    else:
        raise ConfigError(f"{type(source).__name__} gives no gene embeddings; pass a model with gene_embeddings() "
                          "(e.g. scforge.load('default')) or a DataFrame with one row per gene.")
    if wanted is not None and len(table) < len(wanted):
        logger.info("gene embeddings: %d of %d genes have none and are left out", len(wanted) - len(table),
                    len(wanted))
    if len(table) < 2:
        raise GeneIdentityError(f"only {len(table)} of the requested genes have an embedding; a network needs at "
                                "least 2. Check the gene names against the model's vocabulary.")
    values = table.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputDataError("the gene embeddings hold NaN or inf values.")
    return pd.DataFrame(values, index=pd.Index(table.index.astype(str), name="gene"))


def cosine_similarity_table(table: pd.DataFrame) -> pd.DataFrame:
    """Gene x gene cosine similarity of the rows of ``table`` (zero vectors get similarity 0)."""
    x = table.to_numpy(dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    return pd.DataFrame(sim, index=table.index, columns=table.index)


def embedding_network(source: Any, genes: Sequence[str] | None = None) -> GeneNetwork:
    """Undirected network of cosine similarities between gene embeddings (scGPT's GRN tutorial).

    ``source``: a model with ``gene_embeddings`` (scGPT: the gene encoder output after its LayerNorm)
    or a DataFrame with one embedding per gene; ``genes`` (e.g. the data's HVGs) restricts it.
    Then ``.edges(threshold=0.4)`` and ``.programs(resolution=..., min_size=5)``."""
    table = gene_embedding_table(source, genes)
    requested = len(table) if genes is None else len(set(map(str, genes)))
    return GeneNetwork(cosine_similarity_table(table), "embedding",
                       info={"n_genes": len(table), "n_requested": requested, "dim": int(table.shape[1])})
