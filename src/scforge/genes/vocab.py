"""Model gene vocabularies: token <-> id, special tokens, and the file formats they ship in.

* scGPT ``vocab.json``: ``{token: id}`` with consecutive ids (:meth:`GeneVocab.from_scgpt_json`);
  scGPT consumers append ``<pad>``, ``<cls>``, ``<eoc>`` when absent, and so does scforge.
* Geneformer ``token_dictionary*.pkl``: ``{token: numpy.int16 | int}`` read with the restricted
  unpickler (:meth:`GeneVocab.from_geneformer_pickle`).
* A plain ordered gene list, e.g. scBERT's 16,906-gene panel (:meth:`GeneVocab.from_gene_list`,
  ``.txt`` files with one gene per line).
* scforge's own JSON (:meth:`GeneVocab.save` / :meth:`GeneVocab.from_json`).

:meth:`GeneVocab.from_file` picks the right reader from the suffix and the content.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scforge.errors import InputDataError, VocabularyError
from scforge.genes.idtypes import ID_TYPES, IdTypeGuess, detect_id_type

__all__ = ["GeneVocab", "TokenNotFoundError", "SPECIAL_ROLES", "KNOWN_SPECIAL_TOKENS"]

SPECIAL_ROLES = ("pad", "cls", "eoc", "mask", "eos")
#: special tokens recognised by name when a vocabulary file is read
KNOWN_SPECIAL_TOKENS = {"<pad>": "pad", "<cls>": "cls", "<eoc>": "eoc", "<mask>": "mask", "<eos>": "eos"}
SCGPT_SPECIALS = ("<pad>", "<cls>", "<eoc>")
FORMAT_NAME = "scforge.GeneVocab"
FORMAT_VERSION = 1


class TokenNotFoundError(VocabularyError, KeyError):
    """A token is not in the vocabulary (a :class:`VocabularyError` that is also a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _specials_by_name(tokens: Sequence[str]) -> dict[str, str]:
    return {KNOWN_SPECIAL_TOKENS[t]: t for t in tokens if t in KNOWN_SPECIAL_TOKENS}


def _check_consecutive(pairs: list[tuple[str, int]], where: str) -> list[str]:
    """Tokens ordered by id; raise unless the ids are exactly 0..n-1."""
    if not pairs:
        raise VocabularyError(f"The vocabulary in {where} is empty. Use a vocabulary with at least one gene.")
    pairs = sorted(pairs, key=lambda p: p[1])
    ids = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
    expected = np.arange(len(pairs), dtype=np.int64)
    if not np.array_equal(ids, expected):
        dup = ids[1:][np.diff(ids) == 0]
        if dup.size:
            same = [t for t, i in pairs if i == dup[0]][:3]
            raise VocabularyError(
                f"The vocabulary in {where} gives the same id {int(dup[0])} to several tokens "
                f"({', '.join(map(repr, same))}); {int(dup.size)} duplicate ids in all. Every token "
                "needs its own id: fix or regenerate the file."
            )
        bad = int(np.flatnonzero(ids != expected)[0])
        raise VocabularyError(
            f"The vocabulary in {where} does not have consecutive ids 0..{len(pairs) - 1}: after "
            f"sorting by id, position {bad} holds id {int(ids[bad])} (token {pairs[bad][0]!r}); ids "
            f"range {int(ids[0])}..{int(ids[-1])}. Renumber the tokens 0..n-1 in order."
        )
    return [p[0] for p in pairs]


def _as_int_id(value: Any, token: str, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise VocabularyError(
            f"The vocabulary in {where} maps {token!r} to {value!r} ({type(value).__name__}); ids "
            "must be integers. Is this really a token -> id vocabulary (not e.g. a median or "
            "symbol -> Ensembl dictionary)?"
        )
    return int(value)


def _pairs_from_mapping(mapping: Any, where: str) -> list[tuple[str, int]]:
    if not isinstance(mapping, Mapping):
        raise VocabularyError(
            f"{where} holds a {type(mapping).__name__}, not a token -> id mapping. Expected a "
            "dict like {\"GAPDH\": 0, ...}."
        )
    pairs = []
    for token, value in mapping.items():
        if not isinstance(token, str):
            raise VocabularyError(
                f"The vocabulary in {where} has a non-string token {token!r} "
                f"({type(token).__name__}); tokens must be gene names (str)."
            )
        pairs.append((token, _as_int_id(value, token, where)))
    return pairs


class GeneVocab:
    """An ordered gene vocabulary: token (str) -> id (int), ids consecutive ``0..n-1``.

    Parameters
    ----------
    tokens
        Tokens in id order (``tokens[i]`` has id ``i``); gene names and special tokens.
    specials
        ``{role: token}`` for special tokens, roles among ``pad``, ``cls``, ``eoc``, ``mask``,
        ``eos``; every special token must be in ``tokens``.
    id_type
        Identifier type of the gene tokens; detected from the tokens on first use when omitted.
    name
        Optional label (e.g. the file it was read from), shown in coverage reports.

    The object is treated as immutable: do not modify ``tokens`` in place.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        specials: Mapping[str, str] | None = None,
        id_type: str | None = None,
        name: str | None = None,
    ) -> None:
        where = name or "the token list"
        tokens = list(tokens)
        if not tokens:
            raise VocabularyError(f"The vocabulary from {where} is empty; give at least one gene token.")
        if not all(isinstance(t, str) for t in tokens):
            bad = next(t for t in tokens if not isinstance(t, str))
            raise VocabularyError(
                f"The vocabulary from {where} has a non-string token {bad!r} ({type(bad).__name__}) "
                f"at id {tokens.index(bad)}; tokens must be gene names (str)."
            )
        index = pd.Index(tokens, dtype=object)
        if not index.is_unique:
            dups = index[index.duplicated()].unique()[:5].tolist()
            raise VocabularyError(
                f"The vocabulary from {where} has duplicate tokens ({', '.join(map(repr, dups))}); "
                "each token must appear once. Remove the duplicates (keep the first) and renumber."
            )
        specials = dict(specials or {})
        for role, tok in specials.items():
            if role not in SPECIAL_ROLES:
                raise VocabularyError(
                    f"Unknown special-token role {role!r} in {where}; roles are {', '.join(SPECIAL_ROLES)}."
                )
            if tok not in index:
                raise VocabularyError(
                    f"The special token {tok!r} (role {role!r}) is not among the tokens of {where}. "
                    "Add it to the token list or drop it from specials."
                )
        if id_type is not None and id_type not in ID_TYPES:
            raise VocabularyError(f"id_type must be one of {', '.join(ID_TYPES)}, got {id_type!r}.")
        self._tokens = tokens
        self._index = index
        self._specials = specials
        self._id_type = id_type
        self.name = name
        self._cache: dict[str, Any] = {}

    # ---- mapping protocol ------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        """All tokens in id order (do not modify)."""
        return self._tokens

    @property
    def specials(self) -> dict[str, str]:
        """``{role: token}`` of the special tokens."""
        return dict(self._specials)

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and token in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._tokens)

    def __getitem__(self, token: str) -> int:
        try:
            loc = self._index.get_loc(token)
        except (KeyError, TypeError):
            raise TokenNotFoundError(
                f"{token!r} is not in the vocabulary{f' {self.name}' if self.name else ''} "
                f"({len(self)} tokens). Use vocab.lookup(genes) to get -1 for missing genes, or "
                "scforge.genes.align_genes to map synonyms and other id types."
            ) from None
        return int(loc)

    def get(self, token: str, default: int | None = None) -> int | None:
        return int(self._index.get_loc(token)) if token in self else default

    def token(self, id: int) -> str:
        """The token with id ``id``."""
        i = int(id)
        if not 0 <= i < len(self._tokens):
            raise VocabularyError(f"Token id {id} is out of range for a vocabulary of {len(self)} tokens (0..{len(self) - 1}).")
        return self._tokens[i]

    def lookup(self, genes: Sequence[str]) -> np.ndarray:
        """Token ids of ``genes`` (int64), ``-1`` where a gene is not in the vocabulary."""
        if isinstance(genes, str):
            genes = [genes]
        query = pd.Index(np.asarray(genes, dtype=object).ravel()).astype(str)
        return np.asarray(self._index.get_indexer(query), dtype=np.int64)

    def to_dict(self) -> dict[str, int]:
        """``{token: id}``."""
        return {t: i for i, t in enumerate(self._tokens)}

    # ---- specials ---------------------------------------------------------------------------
    def special_id(self, role: str) -> int:
        """Id of the special token with ``role`` (``pad``, ``cls``, ``eoc``, ``mask``, ``eos``)."""
        if role not in self._specials:
            have = ", ".join(f"{r}={t}" for r, t in self._specials.items()) or "none"
            raise VocabularyError(
                f"The vocabulary{f' {self.name}' if self.name else ''} has no {role!r} special token "
                f"(its specials: {have}). Use a vocabulary with one (e.g. scGPT vocabularies get "
                "<pad>/<cls>/<eoc> with add_specials=True; Geneformer V2 has <cls>/<eos>, V1 has not)."
            )
        return self[self._specials[role]]

    def _optional_special(self, role: str) -> int | None:
        return self[self._specials[role]] if role in self._specials else None

    @property
    def pad_id(self) -> int | None:
        return self._optional_special("pad")

    @property
    def cls_id(self) -> int | None:
        return self._optional_special("cls")

    @property
    def eoc_id(self) -> int | None:
        return self._optional_special("eoc")

    @property
    def mask_id(self) -> int | None:
        return self._optional_special("mask")

    @property
    def eos_id(self) -> int | None:
        return self._optional_special("eos")

    @property
    def gene_tokens(self) -> list[str]:
        """Tokens that are not special tokens, in id order."""
        special = set(self._specials.values())
        return [t for t in self._tokens if t not in special]

    # ---- identifier type --------------------------------------------------------------------
    @property
    def id_type_guess(self) -> IdTypeGuess:
        """Detection result for the gene tokens (cached)."""
        if "guess" not in self._cache:
            self._cache["guess"] = detect_id_type(self.gene_tokens)
        return self._cache["guess"]

    @property
    def id_type(self) -> str:
        """Identifier type of the gene tokens (``symbol``, ``ensembl``, ``mouse_symbol``, ...)."""
        if self._id_type is None:
            self._id_type = self.id_type_guess.id_type
        return self._id_type

    # ---- dunder -----------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneVocab):
            return NotImplemented
        return self._tokens == other._tokens and self._specials == other._specials

    def __hash__(self) -> int:  # consistent with __eq__, cheap
        return hash((len(self._tokens), self._tokens[0], self._tokens[-1], tuple(sorted(self._specials.items()))))

    def __repr__(self) -> str:
        specials = ", ".join(f"{r}={self[t]}" for r, t in self._specials.items())
        id_type = self._id_type or "?"
        label = f", name={self.name!r}" if self.name else ""
        return f"GeneVocab({len(self)} tokens, id_type={id_type}, specials=[{specials}]{label})"

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_gene_list(
        cls,
        genes: Sequence[str],
        specials: Mapping[str, str] | Sequence[str] | None = None,
        *,
        id_type: str | None = None,
        name: str | None = None,
    ) -> GeneVocab:
        """Vocabulary of an ordered gene list (e.g. scBERT's panel): ``genes[i]`` gets id ``i``.

        ``specials`` is ``{role: token}`` or a list of known special tokens (``"<pad>"``, ...);
        special tokens not already in ``genes`` are appended after the genes.
        """
        tokens = list(genes)
        if specials is None:
            spec: dict[str, str] = {}
        elif isinstance(specials, Mapping):
            spec = dict(specials)
        else:
            spec = {}
            for tok in specials:
                if tok not in KNOWN_SPECIAL_TOKENS:
                    raise VocabularyError(
                        f"Cannot infer the role of special token {tok!r}; pass specials as a dict "
                        f"{{role: token}} with roles among {', '.join(SPECIAL_ROLES)}."
                    )
                spec[KNOWN_SPECIAL_TOKENS[tok]] = tok
        present = set(tokens)
        tokens += [t for t in spec.values() if t not in present]
        return cls(tokens, spec, id_type=id_type, name=name)

    @classmethod
    def from_scgpt_json(cls, path: str | os.PathLike, add_specials: bool = True) -> GeneVocab:
        """scGPT ``vocab.json`` (``{symbol: id}``, ids consecutive).

        With ``add_specials`` (the default, as scGPT's own consumers do) ``<pad>``, ``<cls>`` and
        ``<eoc>`` are appended when absent, so the 60,694-gene census vocab gets ids 60694-60696.
        """
        path = Path(path)
        data = _read_json(path)
        tokens = _check_consecutive(_pairs_from_mapping(data, f"'{path}'"), f"'{path}'")
        if add_specials:
            present = set(tokens)
            tokens += [t for t in SCGPT_SPECIALS if t not in present]
        return cls(tokens, _specials_by_name(tokens), name=path.name)

    def to_scgpt_json(self, path: str | os.PathLike) -> None:
        """Write ``{token: id}`` in id order (scGPT's ``vocab.json`` format)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_geneformer_pickle(cls, path: str | os.PathLike) -> GeneVocab:
        """Geneformer ``token_dictionary*.pkl`` (restricted unpickler; numpy int ids -> int).

        ``<pad>``, ``<mask>``, ``<cls>``, ``<eos>`` are recognised by name with their ids read
        from the file.
        """
        from scforge.safe_pickle import safe_load_pickle

        path = Path(path)
        try:
            data = safe_load_pickle(path)
        except InputDataError as exc:
            raise VocabularyError(
                f"Cannot read the Geneformer token dictionary '{path}': {exc}"
            ) from None
        tokens = _check_consecutive(_pairs_from_mapping(data, f"'{path}'"), f"'{path}'")
        return cls(tokens, _specials_by_name(tokens), name=path.name)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GeneVocab:
        """scforge's own JSON format (written by :meth:`save`)."""
        path = Path(path)
        data = _read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise VocabularyError(
                f"'{path}' is not a scforge vocabulary (no \"format\": \"{FORMAT_NAME}\"). For an scGPT "
                "vocab.json use GeneVocab.from_scgpt_json, or GeneVocab.from_file to detect the format."
            )
        if data.get("version") != FORMAT_VERSION:
            raise VocabularyError(
                f"'{path}' is scforge vocabulary format version {data.get('version')!r}; this scforge "
                f"reads version {FORMAT_VERSION}. Upgrade scforge or re-save the vocabulary."
            )
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise VocabularyError(f"'{path}' has no \"tokens\" list; the file is damaged. Re-save the vocabulary.")
        specials = data.get("specials") or {}
        if not isinstance(specials, dict):
            raise VocabularyError(f"'{path}': \"specials\" must be an object {{role: token}}.")
        return cls(tokens, specials, id_type=data.get("id_type"), name=path.name)

    def save(self, path: str | os.PathLike) -> None:
        """Write scforge's JSON format (tokens in id order, specials, id type)."""
        payload = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokens": self._tokens,
            "specials": self._specials,
            "id_type": self.id_type,
        }
        Path(path).write_text(json.dumps(payload, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_text(cls, path: str | os.PathLike) -> GeneVocab:
        """One token per line (``.txt`` or ``.txt.gz``); known special tokens are recognised by name."""
        path = Path(path)
        try:
            raw = path.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError) as exc:
            raise VocabularyError(f"Cannot read the gene list '{path}': {exc}. Give a UTF-8 text file, one gene per line.") from None
        lines = [ln.strip() for ln in text.splitlines()]
        while lines and lines[-1] == "":
            lines.pop()
        if "" in lines:
            raise VocabularyError(
                f"The gene list '{path}' has an empty line (line {lines.index('') + 1}); every line "
                "must hold one gene because the line number is the token id. Remove blank lines."
            )
        return cls(lines, _specials_by_name(lines), name=path.name)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GeneVocab:
        """Read a vocabulary, choosing the format from the suffix and the content.

        ``.pkl``/``.pickle``: Geneformer token dictionary; ``.json``: scforge's format when it has
        a ``"format"`` key, else scGPT ``{token: id}``; ``.txt`` (or anything else that is text):
        one gene per line. A folder holding ``vocab.json`` (an scGPT checkpoint) also works.
        """
        path = Path(path)
        if path.is_dir():
            if (path / "vocab.json").is_file():
                return cls.from_scgpt_json(path / "vocab.json")
            raise VocabularyError(
                f"'{path}' is a folder without vocab.json. Pass the vocabulary file itself, or use "
                "scforge.genes.load_geneformer_dictionaries for a Geneformer dictionary folder."
            )
        if not path.is_file():
            raise VocabularyError(f"The vocabulary file '{path}' does not exist. Check the path.")
        suffixes = [s.lower() for s in path.suffixes]
        suffix = suffixes[-1] if suffixes else ""
        if suffix in (".pkl", ".pickle"):
            return cls.from_geneformer_pickle(path)
        if suffix == ".json":
            return cls._from_any_json(path)
        if suffix in (".txt", ".tsv", ".csv") or suffixes[-2:] == [".txt", ".gz"]:
            return cls.from_text(path)
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            return cls.from_geneformer_pickle(path)
        if head[:1] in (b"{", b"["):
            return cls._from_any_json(path)
        return cls.from_text(path)

    @classmethod
    def _from_any_json(cls, path: Path) -> GeneVocab:
        data = _read_json(path)
        if isinstance(data, dict) and "format" in data:
            return cls.from_json(path)
        if isinstance(data, list):
            return cls.from_gene_list(data, name=path.name)
        return cls.from_scgpt_json(path)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise VocabularyError(f"The vocabulary file '{path}' does not exist. Check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VocabularyError(
            f"Cannot parse '{path}' as JSON ({exc}). An scGPT vocab.json must be an object "
            "{\"GENE\": id, ...}; re-download or re-create the file."
        ) from None
    except OSError as exc:
        raise VocabularyError(f"Cannot read the vocabulary file '{path}': {exc}.") from None
