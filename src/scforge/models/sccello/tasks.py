"""scCello's downstream tasks on frozen embeddings.

* :func:`linear_probe`: logistic regression on frozen cell embeddings (accuracy, macro F1).
* :func:`classify_novel_cell_types`: zero-shot classification into cell types never trained on,
  through the ontology (Spearman correlation of a cell's similarities to the seen-type prototypes
  with each novel type's PPR similarities to the seen types).
* :func:`marker_gene_prediction`: in-silico knock-out of each gene of a cell; the embedding shift
  ranks marker genes (AUROC, averaged over cells).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from scforge.errors import ConfigError, InputDataError
from scforge.metrics import ClassificationReport, classification_metrics
from scforge.nn import autocast, resolve_device, resolve_precision
from scforge.ontology import CellTypeRelations
from scforge.tokenize.ragged import TokenizedCells

__all__ = [
    "MarkerGeneResult", "NovelCellTypeResult", "classify_novel_cell_types", "linear_probe", "marker_gene_prediction",
    "marker_token_sets", "spearman_rows",
]


def _as_2d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise InputDataError(f"{name} must be a finite 2-d array [cells, dims], got shape {arr.shape}.")
    return arr


def linear_probe(train_emb: np.ndarray, train_labels: Sequence[Any], test_emb: np.ndarray,
                 test_labels: Sequence[Any], *, C: float = 1.0, max_iter: int = 2000,
                 seed: int = 0) -> ClassificationReport:
    """Multinomial logistic regression on standardised frozen embeddings; scores on the test cells."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = _as_2d(train_emb, "train_emb"), _as_2d(test_emb, "test_emb")
    y_train, y_test = np.asarray(train_labels).astype(str), np.asarray(test_labels).astype(str)
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise InputDataError("one label per embedding row is needed for both train and test.")
    if np.unique(y_train).size < 2:
        raise InputDataError("linear probing needs at least two classes among the training labels.")
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    clf.fit(scaler.transform(x_train), y_train)
    return classification_metrics(y_test, clf.predict(scaler.transform(x_test)))


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every row of ``a`` [n, d] with every row of ``b`` [k, d] -> [n, k]
    (average ranks for ties; 0 where a row is constant)."""
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    na = np.linalg.norm(ra, axis=1, keepdims=True)
    nb = np.linalg.norm(rb, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (ra @ rb.T) / (na * nb.T)
    return np.nan_to_num(out, nan=0.0)


@dataclass
class NovelCellTypeResult:
    """``predictions``: a novel CL id per query cell; ``scores`` [cells, novel types] (Spearman);
    ``report``: accuracy / macro F1 when true types were given."""

    novel_types: list[str]
    predictions: np.ndarray
    scores: np.ndarray
    report: ClassificationReport | None = None


def classify_novel_cell_types(query_emb: np.ndarray, reference_emb: np.ndarray, reference_types: Sequence[str],
                              novel_types: Sequence[str], relations: CellTypeRelations, *,
                              true_types: Sequence[str] | None = None, temperature: float = 0.1) -> NovelCellTypeResult:
    """scCello's zero-shot novel cell type classification.

    Prototypes = mean reference embedding per seen type (the types of ``reference_types``); each
    query cell's vector = ``cos(cell, prototype) / temperature``; each novel type's vector = its raw
    PPR similarities to the seen types (``relations.ppr[novel, seen]``); score = Spearman
    correlation of the two; prediction = the best-scoring novel type.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    query, reference = _as_2d(query_emb, "query_emb"), _as_2d(reference_emb, "reference_emb")
    ref_types = np.asarray(reference_types).astype(str)
    if ref_types.size != len(reference):
        raise InputDataError(f"{ref_types.size} reference types for {len(reference)} reference embeddings.")
    seen = sorted(set(ref_types.tolist()))
    novel = list(novel_types)
    overlap = sorted(set(seen) & set(novel))
    if overlap:
        raise InputDataError(f"novel types {overlap} also occur among the reference (seen) types.")
    if len(seen) < 2 or not novel:
        raise InputDataError("need at least two seen types and one novel type.")
    prototypes = np.stack([reference[ref_types == t].mean(axis=0) for t in seen])
    unit = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    proto_unit = prototypes / np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)
    similarity = unit @ proto_unit.T / temperature
    novel_vectors = relations.ppr[np.ix_(relations.index(novel), relations.index(seen))]
    scores = spearman_rows(similarity, novel_vectors)
    predictions = np.asarray(novel, dtype=object)[scores.argmax(axis=1)]
    report = None
    if true_types is not None:
        report = classification_metrics(np.asarray(true_types).astype(str), predictions.astype(str), labels=novel)
    return NovelCellTypeResult(novel_types=novel, predictions=predictions, scores=scores, report=report)


@dataclass
class MarkerGeneResult:
    """``auroc``: mean over scored cells; ``per_cell``: AUROC per cell (NaN where a cell's genes are all
    markers or none is); ``n_scored``: cells with both classes."""

    auroc: float
    per_cell: np.ndarray
    n_scored: int


def marker_token_sets(model: Any, cell_labels: Sequence[Any], markers: Mapping[str, Sequence[str]]) -> list[set[int]]:
    """Token ids of each cell's marker genes (``markers``: label -> gene names, matched to the model's
    vocabulary like data genes; unknown genes are skipped)."""
    from scforge.genes import align_genes

    ids: dict[str, set[int]] = {}
    for label, genes in markers.items():
        tokens = align_genes(list(genes), model.dictionaries.vocab).token_ids
        ids[str(label)] = {int(t) for t in tokens if t >= 0}
    return [ids.get(str(label), set()) for label in cell_labels]


def _knockout_embeddings(module, tokens: np.ndarray, batch_size: int, dev: torch.device,
                         dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The cell's embedding and one embedding per gene position with that gene removed."""
    n = tokens.size - 1  # genes after <cls>
    grid = np.broadcast_to(tokens, (n, tokens.size))
    keep = np.ones((n, tokens.size), dtype=bool)
    keep[np.arange(n), np.arange(1, n + 1)] = False
    perturbed = grid[keep].reshape(n, n)
    sequences = [tokens[None, :]] + [perturbed[i:i + batch_size] for i in range(0, n, batch_size)]
    out = []
    for block in sequences:
        ids = torch.as_tensor(np.ascontiguousarray(block), dtype=torch.long, device=dev)
        lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64, device=dev)
        cu = torch.zeros(ids.shape[0] + 1, dtype=torch.int64, device=dev)
        cu[1:] = torch.cumsum(lengths, 0)
        hidden = module.encode(ids.reshape(-1), cu_seqlens=cu, max_seqlen=int(ids.shape[1]))
        out.append(module.cell_outputs(hidden, cu).float().cpu().numpy())
    emb = np.concatenate(out)
    return emb[0], emb[1:]


def marker_gene_prediction(model: Any, cells: TokenizedCells, markers: Sequence[set[int]], *, batch_size: int = 256,
                           device: Any = "auto", precision: str = "auto", progress: bool = False) -> MarkerGeneResult:
    """Zero-shot marker gene prediction by in-silico knock-out.

    For each cell (``model.tokenize`` output, ``<cls>`` first) every gene is removed in turn (the
    perturbed sequences are run in batches of ``batch_size``); a gene's score is
    ``1 - cos(cell embedding, perturbed embedding)``; the cell's AUROC ranks its marker genes
    (``markers[i]``: token ids) above its other genes. Cells without both classes are skipped.
    """
    from sklearn.metrics import roc_auc_score
    from tqdm.auto import tqdm

    if len(markers) != cells.n_cells:
        raise InputDataError(f"{len(markers)} marker sets for {cells.n_cells} cells.")
    if cells.meta.get("cls_id") != model.config.cls_token_id:
        raise InputDataError("these tokenized cells have no scCello <cls> token first; make them with model.tokenize().")
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    module = model.module.to(dev).eval()
    per_cell = np.full(cells.n_cells, np.nan)
    with torch.inference_mode(), autocast(dev, dtype):
        for i in tqdm(range(cells.n_cells), desc="scCello knock-out", disable=not progress, leave=False):
            tokens = np.asarray(cells.cell(i)[0], dtype=np.int64)
            genes = tokens[1:]
            is_marker = np.isin(genes, np.fromiter(markers[i], dtype=np.int64, count=len(markers[i])))
            if genes.size < 2 or is_marker.all() or not is_marker.any():
                continue
            base, knocked = _knockout_embeddings(module, tokens, batch_size, dev, dtype)
            cos = knocked @ base / np.maximum(np.linalg.norm(knocked, axis=1) * np.linalg.norm(base), 1e-12)
            per_cell[i] = roc_auc_score(is_marker, 1.0 - cos)
    scored = np.isfinite(per_cell)
    if not scored.any():
        raise InputDataError("no cell has both marker and non-marker genes among its tokens; check the marker "
                             "table's gene names and the cells' labels.")
    return MarkerGeneResult(auroc=float(per_cell[scored].mean()), per_cell=per_cell, n_scored=int(scored.sum()))
