"""Match a dataset's gene names to a model vocabulary.

:func:`align_genes` tries, for each gene still unmatched, in this order:

0. ``mapping_dict``: with ``ensembl_mapping`` (Geneformer's ``ensembl_mapping_dict``), the
   upper-cased id (or its version-stripped form) is mapped to its canonical id first, as
   Geneformer's ``collapse_gene_ids`` does; several data genes may collapse onto one token.
1. ``exact``: the name is a token.
2. ``version``: ``ENSG00000141510.17`` -> ``ENSG00000141510``.
3. ``case``: a case-insensitive match to exactly one gene token (``C1ORF159`` -> ``C1orf159``);
   skipped when the data and the vocabulary are of different species.
4. With ``use_synonyms`` (the default), through the shipped HGNC/MGI/Ensembl tables:

   * ``previous`` / ``alias``: a symbol and a vocabulary token that name the same approved gene
     (an old symbol in the data and the current one in the vocabulary, or the reverse). Only
     unambiguous synonyms are used (all previous/alias associations of the name point to one
     approved symbol) and only when the gene is in the vocabulary.
   * ``symbol_to_ensembl``: symbol (approved, or an unambiguous synonym) -> HGNC/MGI Ensembl id,
     for an Ensembl vocabulary.
   * ``ensembl_to_symbol``: Ensembl id -> approved symbol, for a symbol vocabulary.
   * ``ortholog``: mouse gene (symbol, or ``ENSMUSG`` through MGI) -> human ortholog (Ensembl 105
     table; one ortholog per gene, see :mod:`scforge.genes._tables`) -> the vocabulary, as a
     human gene; and human -> mouse for a mouse vocabulary.

A step-4 match never joins a token that an earlier step already gave to another data gene: a
synonym is a weaker claim than an exact name, so e.g. ``SEPT7`` is left unmatched when the data
also hold ``SEPTIN7``. Genes matched in steps 0-3 may share a token (e.g. two versions of one
Ensembl id, or ids collapsed by ``ensembl_mapping``); tokenizers sum such duplicates.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.strings as np_strings
import pandas as pd

from scforge.errors import GeneIdentityError
from scforge.genes._tables import SpeciesIndex, ortholog_index, species_index
from scforge.genes.idtypes import (
    HUMAN_ENSEMBL_RE,
    MOUSE_ENSEMBL_RE,
    ensembl_like,
    regex_where,
    IdTypeGuess,
    detect_id_type,
    kind_of,
    species_of,
)
from scforge.genes.vocab import GeneVocab

__all__ = [
    "GeneAlignment",
    "align_genes",
    "strip_version",
    "map_symbols_to_ensembl",
    "map_ensembl_to_symbols",
    "mouse_to_human",
    "human_to_mouse",
    "METHODS",
]

logger = logging.getLogger("scforge")

METHODS = (
    "exact", "version", "case", "alias", "previous", "symbol_to_ensembl", "ensembl_to_symbol",
    "ortholog", "mapping_dict", "unmatched",
)
_STRONG = ("exact", "version", "case", "mapping_dict")
_VERSION_PATTERN = r"^(ENS[A-Z]*\d{6,})\.\d+(_PAR_Y)?$"


# ---- small vectorised helpers ----------------------------------------------------------------
def _as_object_array(values: Sequence[str]) -> np.ndarray:
    if isinstance(values, str):
        values = [values]
    arr = np.asarray(values, dtype=object).ravel()
    if pd.api.types.infer_dtype(arr, skipna=False) == "string":  # all str already (C check)
        return arr.copy()
    out = np.empty(arr.size, dtype=object)
    out[:] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in arr]
    return out


def _series(values: np.ndarray) -> pd.Series:
    return pd.Series(values, dtype=object)


def strip_version(ids: Sequence[str] | str) -> np.ndarray | str:
    """Remove Ensembl version suffixes: ``ENSG00000141510.17`` -> ``ENSG00000141510``.

    ``_PAR_Y`` suffixes are kept (``ENSG00000182378.14_PAR_Y`` -> ``ENSG00000182378_PAR_Y``);
    other names are returned unchanged. A single string gives a string, a sequence an object array.
    """
    if isinstance(ids, str):
        return str(strip_version([ids])[0])
    values = _as_object_array(ids)
    out = values.copy()
    # only names with a dot can carry a version: the regex runs on those alone
    dotted = np_strings.find(values.astype(str), ".") >= 0
    if dotted.any():
        out[dotted] = _series(values[dotted]).str.replace(_VERSION_PATTERN, r"\1\2", regex=True).to_numpy(dtype=object)
    return out


def _map(values: np.ndarray, table: pd.Series) -> np.ndarray:
    """``table[value]`` per element (object array), ``None`` where absent or value is ``None``."""
    out = np.full(values.size, None, dtype=object)
    if values.size == 0 or table.empty:
        return out
    pos = table.index.get_indexer(pd.Index(values, dtype=object))
    hit = pos >= 0
    out[hit] = table.to_numpy(dtype=object)[pos[hit]]
    return out


def _upper(values: np.ndarray) -> np.ndarray:
    return _series(values).str.upper().to_numpy(dtype=object)


def _ensembl_key(values: np.ndarray) -> np.ndarray:
    """Upper-case, version-free Ensembl ids."""
    return _upper(strip_version(values))


# ---- public conversion helpers -----------------------------------------------------------------
def _check_species(species: str) -> SpeciesIndex:
    if species not in ("human", "mouse"):
        raise GeneIdentityError(f"species must be 'human' or 'mouse', got {species!r}.")
    return species_index(species)


def map_symbols_to_ensembl(symbols: Sequence[str], species: str = "human", *, use_synonyms: bool = True) -> np.ndarray:
    """Ensembl gene ids of gene symbols (object array, ``None`` where unknown).

    Approved HGNC (human) or MGI (mouse) symbols are mapped directly; with ``use_synonyms``
    unambiguous previous symbols and aliases are resolved to their approved gene first.
    """
    index = _check_species(species)
    names = _as_object_array(symbols)
    approved, kinds = index.canonical(names)
    if not use_synonyms:
        approved = np.where(kinds == "approved", approved, None)
    return _map(approved, index.symbol_to_ensembl)


def map_ensembl_to_symbols(ids: Sequence[str], species: str = "human") -> np.ndarray:
    """Approved symbols of Ensembl gene ids (version suffixes ignored; ``None`` where unknown)."""
    index = _check_species(species)
    return _map(_ensembl_key(_as_object_array(ids)), index.ensembl_to_symbol)


def _to_own_symbols(names: np.ndarray, species: str, use_synonyms: bool = True) -> np.ndarray:
    """Approved symbols of names that are symbols or Ensembl ids of ``species``."""
    index = species_index(species)
    pattern = HUMAN_ENSEMBL_RE if species == "human" else MOUSE_ENSEMBL_RE
    is_ens = _series(names).str.match(pattern, case=False).fillna(False).to_numpy(dtype=bool)
    out = np.full(names.size, None, dtype=object)
    if is_ens.any():
        out[is_ens] = _map(_ensembl_key(names[is_ens]), index.ensembl_to_symbol)
    sym = ~is_ens
    if sym.any():
        approved, kinds = index.canonical(names[sym])
        if not use_synonyms:
            approved = np.where(kinds == "approved", approved, None)
        out[sym] = approved
    return out


def _ortholog(symbols: np.ndarray, to_species: str) -> np.ndarray:
    """Approved symbols of one species -> symbols of the other (canonicalised where possible)."""
    orth = ortholog_index()
    table = orth.mouse_to_human if to_species == "human" else orth.human_to_mouse
    return _map(symbols, table)


def mouse_to_human(genes: Sequence[str]) -> np.ndarray:
    """Human ortholog symbols of mouse genes (MGI symbols, their synonyms, or ``ENSMUSG`` ids).

    ``None`` where there is no ortholog. One human gene per mouse gene: a one-to-one ortholog,
    else the human symbol equal to the mouse symbol in upper case, else the first in the Ensembl
    105 table (deterministic).
    """
    return _ortholog(_to_own_symbols(_as_object_array(genes), "mouse"), "human")


def human_to_mouse(genes: Sequence[str]) -> np.ndarray:
    """Mouse ortholog symbols of human genes (symbols or ``ENSG`` ids); ``None`` where none."""
    return _ortholog(_to_own_symbols(_as_object_array(genes), "human"), "mouse")


# ---- alignment result --------------------------------------------------------------------------
@dataclass
class GeneAlignment:
    """How each data gene maps to a vocabulary token.

    ``token_ids[i]`` is the token id of ``gene_names[i]`` (-1 when unmatched) and ``method[i]``
    how it was found (one of :data:`METHODS`).
    """

    gene_names: np.ndarray
    token_ids: np.ndarray
    method: np.ndarray
    vocab_id_type: str
    vocab_examples: list[str] = field(default_factory=list)
    use_synonyms: bool = True
    species: str = "auto"
    guess: IdTypeGuess | None = field(default=None, repr=False)

    @property
    def detected(self) -> IdTypeGuess:
        """The data's identifier type (:func:`detect_id_type`), guessed on first use."""
        if self.guess is None:
            self.guess = detect_id_type(self.gene_names)
        return self.guess

    @property
    def n_genes(self) -> int:
        return int(self.token_ids.size)

    @property
    def matched(self) -> np.ndarray:
        """Boolean mask of matched genes."""
        return self.token_ids >= 0

    @property
    def n_matched(self) -> int:
        return int(np.count_nonzero(self.token_ids >= 0))

    @property
    def n_unmatched(self) -> int:
        return self.n_genes - self.n_matched

    @property
    def n_duplicates(self) -> int:
        """Matched genes whose token is already used by an earlier matched gene (they get summed)."""
        ids = self.token_ids[self.token_ids >= 0]
        return int(ids.size - np.unique(ids).size)

    @property
    def unmatched_examples(self) -> list[str]:
        """The first 10 unmatched gene names."""
        return [str(g) for g in self.gene_names[self.token_ids < 0][:10]]

    def method_counts(self) -> dict[str, int]:
        """Number of genes per method (only methods that occur), in :data:`METHODS` order."""
        values, counts = np.unique(self.method.astype(str), return_counts=True)
        found = dict(zip(values.tolist(), counts.tolist()))
        return {m: int(found[m]) for m in METHODS if m in found}

    def require_overlap(self, where: str = "") -> None:
        """Raise :class:`~scforge.errors.GeneIdentityError` when no gene matched the vocabulary."""
        if self.n_matched > 0:
            return
        place = f" of {where}" if where else ""
        d = self.detected
        examples = ", ".join(d.examples[:3]) or ", ".join(map(str, self.gene_names[:3])) or "none"
        vocab_examples = ", ".join(self.vocab_examples[:3]) or "n/a"
        raise GeneIdentityError(
            f"0 of {self.n_genes} genes{place} matched the vocabulary. The data look like "
            f"{d.describe()} (e.g. {examples}) while the vocabulary uses {_describe_type(self.vocab_id_type)} "
            f"(e.g. {vocab_examples}). Fix: {self._hint()} Run scforge.genes.gene_coverage(data, "
            "vocab) to see how the genes match."
        )

    def _hint(self) -> str:
        data_kind, vocab_kind = kind_of(self.detected.id_type), kind_of(self.vocab_id_type)
        data_sp, vocab_sp = self.detected.species, species_of(self.vocab_id_type)
        syn = "" if self.use_synonyms else " Or pass use_synonyms=True so that ids are converted through HGNC/MGI and orthologs."
        if self.detected.id_type == "entrez":
            return ("the names are numeric (Entrez-like) ids, which scforge does not convert: set var_names "
                    "to gene symbols or Ensembl ids, or pass gene_col=<a var column holding them>.")
        if data_kind is None:
            return ("set adata.var_names to gene symbols or Ensembl gene ids, or pass gene_col=<a var "
                    "column holding them> (e.g. 'gene_symbols', 'feature_name', 'gene_ids', 'ensembl_id').")
        if vocab_kind is None:
            return "check that this is the intended vocabulary: its tokens are not recognisable gene ids."
        if data_sp != vocab_sp:
            return (f"the data are {data_sp} and the vocabulary is {vocab_sp}: pass species='{data_sp}' "
                    f"and keep use_synonyms=True to map through orthologs, or use a {data_sp} model "
                    f"vocabulary.{syn}")
        if data_kind != vocab_kind:
            want = "gene symbols (e.g. 'gene_symbols', 'feature_name')" if vocab_kind == "symbol" else \
                "Ensembl ids (e.g. 'gene_ids', 'ensembl_id')"
            return f"pass gene_col=<a var column holding {want}>, or map the ids before tokenizing.{syn}"
        return ("the data and the vocabulary use the same kind of ids but share no gene: check that "
                "this is the right vocabulary and species, and that var_names are not a placeholder index."
                + syn)


def _describe_type(id_type: str) -> str:
    return {
        "symbol": "human gene symbols",
        "ensembl": "human Ensembl gene ids",
        "mouse_symbol": "mouse gene symbols",
        "mouse_ensembl": "mouse Ensembl gene ids",
        "entrez": "numeric gene ids",
    }.get(id_type, "unrecognised gene tokens")


# ---- vocabulary-side indexes (cached on the vocab object) ---------------------------------------
def _gene_token_array(vocab: GeneVocab) -> tuple[np.ndarray, np.ndarray]:
    key = "gene_token_array"
    if key not in vocab._cache:
        tokens = np.asarray(vocab.gene_tokens, dtype=object)
        vocab._cache[key] = (tokens, vocab.lookup(tokens))
    return vocab._cache[key]


def _upper_index(vocab: GeneVocab) -> pd.Series:
    """Upper-cased gene token -> token id, only where the upper-case form is unique."""
    key = "upper_index"
    if key not in vocab._cache:
        tokens, ids = _gene_token_array(vocab)
        up = pd.Series(ids, index=pd.Index(_upper(tokens), dtype=object))
        vocab._cache[key] = up[~up.index.duplicated(keep=False)]
    return vocab._cache[key]


def _canonical_index(vocab: GeneVocab, species: str, use_synonyms: bool) -> tuple[pd.Series, pd.Series]:
    """Approved symbol -> (token id, how the token names it) for a symbol vocabulary.

    A token that is the approved symbol itself wins over previous symbols, which win over aliases;
    several tokens of the same best kind for one gene make that gene ambiguous (dropped).
    """
    key = f"canonical_{species}_{use_synonyms}"
    if key not in vocab._cache:
        tokens, ids = _gene_token_array(vocab)
        approved, kinds = species_index(species).canonical(tokens)
        df = pd.DataFrame({"approved": approved, "kind": kinds, "id": ids})
        df = df[df["approved"].notna()]
        if not use_synonyms:
            df = df[df["kind"] == "approved"]
        df["rank"] = df["kind"].map({"approved": 0, "previous": 1, "alias": 2})
        best = df.groupby("approved")["rank"].transform("min")
        df = df[df["rank"] == best]
        df = df[~df["approved"].duplicated(keep=False)]
        index = pd.Index(df["approved"].to_numpy(dtype=object))
        vocab._cache[key] = (pd.Series(df["id"].to_numpy(), index=index),
                             pd.Series(df["kind"].to_numpy(dtype=object), index=index))
    return vocab._cache[key]


# ---- the aligner -------------------------------------------------------------------------------
class _Aligner:
    def __init__(self, names: np.ndarray, vocab: GeneVocab) -> None:
        self.names = names
        self.vocab = vocab
        self.ids = np.full(names.size, -1, dtype=np.int64)
        self.method = np.full(names.size, "unmatched", dtype=f"<U{max(map(len, METHODS))}")

    def todo(self) -> np.ndarray:
        return self.ids < 0

    def assign(self, rows: np.ndarray, token_ids: np.ndarray, label: str | np.ndarray) -> None:
        """Set ``token_ids`` (>= 0 entries) for ``rows`` (indices of unmatched genes)."""
        ok = token_ids >= 0
        labels = np.asarray([label] if isinstance(label, str) else label, dtype=object)
        if not np.isin(labels[ok] if labels.size == ok.size else labels, _STRONG).all():
            # a weak match (synonym, conversion, ortholog) may not join a token already matched
            claimed = np.unique(self.ids[self.ids >= 0])
            ok &= ~np.isin(token_ids, claimed)
        rows, token_ids = rows[ok], token_ids[ok]
        self.ids[rows] = token_ids
        self.method[rows] = label if isinstance(label, str) else label[ok]

    def assign_names(self, rows: np.ndarray, candidates: np.ndarray, label: str | np.ndarray) -> None:
        has = np.array([c is not None for c in candidates], dtype=bool) if candidates.size else np.zeros(0, bool)
        token_ids = np.full(candidates.size, -1, dtype=np.int64)
        if has.any():
            token_ids[has] = self.vocab.lookup(candidates[has])
        self.assign(rows, token_ids, label)


def align_genes(
    genes: Sequence[str],
    vocab: GeneVocab,
    *,
    species: str = "auto",
    use_synonyms: bool = True,
    ensembl_mapping: Mapping[str, str] | None = None,
) -> GeneAlignment:
    """Match ``genes`` (a dataset's gene names, in column order) to ``vocab``.

    ``species`` (``"auto"``, ``"human"``, ``"mouse"``) says which species gene *symbols* belong
    to; ``auto`` uses :func:`detect_id_type` (Ensembl ids carry their species in the prefix).
    See the module docstring for the order of attempts. Returns a :class:`GeneAlignment`.
    """
    if species not in ("auto", "human", "mouse"):
        raise GeneIdentityError(f"species must be 'auto', 'human' or 'mouse', got {species!r}.")
    if not isinstance(vocab, GeneVocab):
        raise GeneIdentityError(
            f"align_genes needs a GeneVocab, got {type(vocab).__name__}. Load one with "
            "GeneVocab.from_file(path) or scforge.genes.load_geneformer_dictionaries(folder).vocab."
        )
    names = _as_object_array(genes)
    missing = pd.isna(names)
    if missing.any():
        names[missing] = ""
    n = names.size
    vocab_type = vocab.id_type
    vocab_sp, vocab_kind = species_of(vocab_type), kind_of(vocab_type)
    guess: list[IdTypeGuess] = []  # detected on demand: data whose names all match exactly never need it

    def detected() -> IdTypeGuess:
        if not guess:
            guess.append(detect_id_type(names))
        return guess[0]

    @functools.cache
    def per_gene() -> tuple[np.ndarray, np.ndarray]:
        """Each gene's species and kind (Ensembl ids carry their species; symbols get ``species``)."""
        sym_species = species if species != "auto" else (
            detected().species if detected().species != "unknown" else "human")
        s = _series(names)
        ens_like = ensembl_like(names.astype(str))  # the Ensembl regexes run on these only
        is_hens = regex_where(s, HUMAN_ENSEMBL_RE, ens_like, case=False)
        is_mens = regex_where(s, MOUSE_ENSEMBL_RE, ens_like, case=False)
        gene_species = np.where(is_hens, "human", np.where(is_mens, "mouse", sym_species)).astype(object)
        gene_kind = np.where(is_hens | is_mens, "ensembl", "symbol").astype(object)
        return gene_species, gene_kind

    al = _Aligner(names, vocab)
    all_rows = np.arange(n)

    # 0. Geneformer-style canonical id mapping
    if ensembl_mapping:
        table = pd.Series(ensembl_mapping, dtype=object)
        table = table[~table.index.duplicated(keep="first")]
        up = _upper(names)
        cand = _map(up, table)
        miss = np.array([c is None for c in cand], dtype=bool)
        if miss.any():
            cand[miss] = _map(_ensembl_key(names[miss]), table)
        label = np.where(cand == names, "exact", "mapping_dict").astype(object)
        has = np.array([c is not None for c in cand], dtype=bool)
        token_ids = np.full(n, -1, dtype=np.int64)
        if has.any():
            token_ids[has] = vocab.lookup(cand[has])
        al.assign(all_rows, token_ids, label)

    # 1. exact
    rows = np.flatnonzero(al.todo())
    al.assign(rows, vocab.lookup(names[rows]), "exact")

    # 2. version suffix
    rows = np.flatnonzero(al.todo())
    if rows.size:
        stripped = strip_version(names[rows])
        changed = stripped != names[rows]
        al.assign_names(rows[changed], stripped[changed], "version")

    # 3. case-insensitive, unique, same species
    rows = np.flatnonzero(al.todo())
    if rows.size:
        gene_species, gene_kind = per_gene()
        same_sp = (vocab_sp == "unknown") | (gene_species[rows] == vocab_sp)
        rows = rows[same_sp]
        key = _upper(strip_version(names[rows]))
        al.assign(rows, _ids_from(_map(key, _upper_index(vocab))), "case")

    # 4. synonyms, id-type conversion, orthologs
    if use_synonyms and vocab_kind is not None and al.todo().any():
        gene_species, gene_kind = per_gene()
        for sp in ("human", "mouse"):
            rows = np.flatnonzero(al.todo() & (gene_species == sp))
            if not rows.size:
                continue
            if sp == vocab_sp:
                _same_species(al, rows, gene_kind[rows], sp, vocab_kind)
            else:
                _cross_species(al, rows, sp, vocab_sp, vocab_kind)

    alignment = GeneAlignment(
        gene_names=names,
        token_ids=al.ids,
        method=al.method,
        vocab_id_type=vocab_type,
        vocab_examples=list(vocab.id_type_guess.examples[:5]),
        use_synonyms=use_synonyms,
        species=species,
        guess=guess[0] if guess else None,
    )
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "align_genes: %d of %d genes matched (%s); data %s, vocabulary %s",
            alignment.n_matched, n, alignment.method_counts(), alignment.detected.id_type, vocab_type,
        )
    return alignment


def _ids_from(values: np.ndarray) -> np.ndarray:
    """Object array of token ids / None -> int64 with -1."""
    out = np.full(values.size, -1, dtype=np.int64)
    has = np.array([v is not None for v in values], dtype=bool) if values.size else np.zeros(0, bool)
    if has.any():
        out[has] = values[has].astype(np.int64)
    return out


def _symbols_into_vocab(al: _Aligner, rows: np.ndarray, approved: np.ndarray, species: str,
                        vocab_kind: str, label: str) -> None:
    """Approved symbols of ``species`` (the vocabulary's species) -> token ids, then assign."""
    if vocab_kind == "ensembl":
        al.assign_names(rows, _map(approved, species_index(species).symbol_to_ensembl), label)
        return
    ids_table, _ = _canonical_index(al.vocab, species, use_synonyms=True)
    al.assign(rows, _ids_from(_map(approved, ids_table)), label)


def _same_species(al: _Aligner, rows: np.ndarray, kinds: np.ndarray, species: str, vocab_kind: str) -> None:
    index = species_index(species)
    sym_rows, ens_rows = rows[kinds == "symbol"], rows[kinds == "ensembl"]
    if sym_rows.size:
        approved, data_kinds = index.canonical(al.names[sym_rows])
        is_approved = data_kinds == "approved"
        # approved data names first: a synonym may not join a token they already claimed
        for tier in (is_approved, ~is_approved):
            r, ap, dk = sym_rows[tier], approved[tier], data_kinds[tier]
            if not r.size:
                continue
            if vocab_kind == "symbol":
                ids_table, token_kinds = _canonical_index(al.vocab, species, use_synonyms=True)
                token_ids = _ids_from(_map(ap, ids_table))
                # the data name's own synonym kind decides; for an approved data name, the token's
                label = np.where(dk == "approved", _map(ap, token_kinds), dk)
                label = np.where(label == "previous", "previous", "alias").astype(object)
                al.assign(r, token_ids, label)
            else:
                _symbols_into_vocab(al, r, ap, species, vocab_kind, "symbol_to_ensembl")
    if ens_rows.size and vocab_kind == "symbol":
        approved = _map(_ensembl_key(al.names[ens_rows]), index.ensembl_to_symbol)
        _symbols_into_vocab(al, ens_rows, approved, species, vocab_kind, "ensembl_to_symbol")


def _cross_species(al: _Aligner, rows: np.ndarray, from_species: str, to_species: str, vocab_kind: str) -> None:
    own = _to_own_symbols(al.names[rows], from_species)
    other = _ortholog(own, to_species)
    approved, _ = species_index(to_species).canonical(other)
    approved = np.where(pd.isna(approved), other, approved).astype(object)
    _symbols_into_vocab(al, rows, approved, to_species, vocab_kind, "ortholog")
