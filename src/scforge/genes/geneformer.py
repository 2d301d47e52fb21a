"""Geneformer's dictionaries: token ids, gene medians, symbol -> Ensembl, and the id mapping.

File names (all pickles, read with :func:`scforge.safe_pickle.safe_load_pickle`):

* V1 (30M corpus): ``token_dictionary.pkl``, ``gene_median_dictionary.pkl``,
  ``gene_name_id_dict.pkl`` (each also as ``*_gc30M.pkl``) and ``ensembl_mapping_dict_gc30M.pkl``;
* V2 (95M corpus): ``token_dictionary_gc95M.pkl``, ``gene_median_dictionary_gc95M.pkl``,
  ``gene_name_id_dict_gc95M.pkl``, ``ensembl_mapping_dict_gc95M.pkl`` (or ``*_gc104M.pkl``).

The ``gc104M`` files are byte-identical to ``gc95M``. The version is read from the token
dictionary: ``<cls>`` present -> V2, else V1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scforge.errors import InputDataError, VocabularyError
from scforge.genes.vocab import GeneVocab
from scforge.safe_pickle import safe_load_pickle

__all__ = ["GeneformerDictionaries", "load_geneformer_dictionaries"]

logger = logging.getLogger("scforge")

_TAGS = {"V2": ("_gc104M", "_gc95M"), "V1": ("_gc30M", "")}
_KINDS = {
    "token": "token_dictionary",
    "median": "gene_median_dictionary",
    "name": "gene_name_id_dict",
    "mapping": "ensembl_mapping_dict",
}


@dataclass
class GeneformerDictionaries:
    """A Geneformer dictionary set.

    ``vocab``: token ids (specials read from the file); ``medians``: Ensembl id -> non-zero
    median used for normalisation; ``name_to_id``: symbol -> Ensembl id (``None`` if the file is
    absent); ``ensembl_mapping``: id -> canonical Ensembl id used to collapse duplicates
    (``None`` if absent); ``version``: ``"V1"`` or ``"V2"``; ``files``: what was read.
    """

    vocab: GeneVocab
    medians: dict[str, float]
    name_to_id: dict[str, str] | None
    ensembl_mapping: dict[str, str] | None
    version: str
    files: dict[str, str] = field(default_factory=dict)


def _load(path: Path, what: str) -> Any:
    try:
        return safe_load_pickle(path)
    except InputDataError as exc:
        raise VocabularyError(f"Cannot read the Geneformer {what} '{path}': {exc}") from None


def _str_dict(obj: Any, path: Path, what: str) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise VocabularyError(f"The Geneformer {what} '{path}' holds a {type(obj).__name__}, not a dict.")
    bad = next(((k, v) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, str)), None)
    if bad is not None:
        raise VocabularyError(
            f"The Geneformer {what} '{path}' maps {bad[0]!r} to {bad[1]!r}; expected str -> str "
            "(gene name/id -> Ensembl id). Is this the right file?"
        )
    return dict(obj)


def _medians(obj: Any, path: Path) -> dict[str, float]:
    if not isinstance(obj, dict):
        raise VocabularyError(f"The Geneformer median dictionary '{path}' holds a {type(obj).__name__}, not a dict.")
    keys = list(obj.keys())
    if not all(isinstance(k, str) for k in keys):
        raise VocabularyError(f"The Geneformer median dictionary '{path}' has non-string keys; expected Ensembl ids.")
    try:
        values = np.asarray(list(obj.values()), dtype=np.float64)
    except (TypeError, ValueError):
        raise VocabularyError(
            f"The Geneformer median dictionary '{path}' has non-numeric values; expected Ensembl id -> "
            "median. Is this the token dictionary instead?"
        ) from None
    return dict(zip(keys, values.tolist()))


def _find(folder: Path, kind: str, tags: tuple[str, ...]) -> Path | None:
    for tag in tags:
        path = folder / f"{_KINDS[kind]}{tag}.pkl"
        if path.is_file():
            return path
    return None


def _tag_of(token_path: Path) -> str:
    stem = token_path.stem
    prefix = _KINDS["token"]
    return stem[len(prefix):] if stem.startswith(prefix) else ""


def load_geneformer_dictionaries(
    folder_or_token_dict_path: str | os.PathLike, version: str | None = None
) -> GeneformerDictionaries:
    """Load Geneformer's dictionaries from a folder or from the token dictionary's path.

    In a folder the V2 names (``*_gc104M.pkl``, ``*_gc95M.pkl``) are looked for first, then the
    V1 names (``*_gc30M.pkl``, plain names), and ``gene_dictionaries_30m/`` for V1 inside the
    Geneformer package folder; ``version="V1"``/``"V2"`` restricts the search. Given a token
    dictionary path, the sibling files with the same suffix are used (falling back to the other
    names of the same version). The median dictionary is required; the name and mapping
    dictionaries are optional (``None`` when absent).
    """
    if version is not None:
        version = str(version).upper()
        if version not in _TAGS:
            raise VocabularyError(f"version must be 'V1', 'V2' or None, got {version!r}.")
    path = Path(folder_or_token_dict_path)
    if path.is_dir():
        folder = path
        versions = [version] if version else ["V2", "V1"]
        token_path = None
        for v in versions:
            token_path = _find(folder, "token", _TAGS[v])
            if token_path is None and v == "V1" and (folder / "gene_dictionaries_30m").is_dir():
                folder = folder / "gene_dictionaries_30m"
                token_path = _find(folder, "token", _TAGS[v])
            if token_path is not None:
                break
        if token_path is None:
            names = [f"{_KINDS['token']}{t}.pkl" for v in versions for t in _TAGS[v]]
            raise VocabularyError(
                f"No Geneformer token dictionary in the folder '{path}' (looked for {', '.join(names)}). "
                "Pass the folder holding Geneformer's dictionary pickles, or the token dictionary path."
            )
    elif path.is_file():
        token_path, folder = path, path.parent
    else:
        raise VocabularyError(
            f"'{path}' does not exist. Pass a folder with Geneformer's dictionary pickles or the path "
            "of token_dictionary*.pkl."
        )

    vocab = GeneVocab.from_geneformer_pickle(token_path)
    found_version = "V2" if "<cls>" in vocab else "V1"
    if version is not None and version != found_version:
        raise VocabularyError(
            f"version={version!r} was requested but the token dictionary '{token_path}' is a "
            f"{found_version} dictionary ({'has' if found_version == 'V2' else 'has no'} <cls> token). "
            "Use the dictionaries that belong to the model (V1: 25,426 tokens, V2: 20,275)."
        )
    version = found_version
    tag = _tag_of(token_path)
    tags = (tag,) + tuple(t for t in _TAGS[version] if t != tag)

    median_path = _find(folder, "median", tags)
    if median_path is None:
        raise VocabularyError(
            f"No gene median dictionary next to '{token_path}' (looked for "
            f"{', '.join(_KINDS['median'] + t + '.pkl' for t in tags)} in '{folder}'). Geneformer's "
            "normalisation needs it: put the median file of the same version beside the token dictionary."
        )
    medians = _medians(_load(median_path, "median dictionary"), median_path)
    files = {"token_dictionary": str(token_path), "gene_median_dictionary": str(median_path)}

    name_path = _find(folder, "name", tags)
    name_to_id = None
    if name_path is not None:
        name_to_id = _str_dict(_load(name_path, "gene name dictionary"), name_path, "gene name dictionary")
        files["gene_name_id_dict"] = str(name_path)
    mapping_path = _find(folder, "mapping", tags)
    ensembl_mapping = None
    if mapping_path is not None:
        ensembl_mapping = _str_dict(_load(mapping_path, "Ensembl mapping dictionary"), mapping_path,
                                    "Ensembl mapping dictionary")
        files["ensembl_mapping_dict"] = str(mapping_path)

    n_genes = len(vocab) - len(vocab.specials)
    missing = n_genes - int(np.count_nonzero(vocab.lookup(list(medians)) >= 0))
    if missing > 0:
        logger.warning(
            "%d of %d genes of the Geneformer token dictionary '%s' have no median in '%s'.",
            missing, n_genes, token_path, median_path,
        )
    logger.debug("loaded Geneformer %s dictionaries: %s", version, files)
    return GeneformerDictionaries(vocab, medians, name_to_id, ensembl_mapping, version, files)
