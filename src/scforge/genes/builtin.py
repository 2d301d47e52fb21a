"""Model vocabularies shipped inside scforge, so tokenizing works offline with no downloads.

``scgpt-human`` (scGPT whole-human vocab, 60,697 tokens with specials), ``geneformer-v1``
(25,426 tokens, 2,048 input) and ``geneformer-v2`` (20,275 tokens, 4,096 input) with their gene
medians. Built by ``scripts/build_builtin_vocabs.py``; see ``tables/NOTICE.md`` for licences.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from scforge.errors import VocabularyError
from scforge.genes.geneformer import GeneformerDictionaries, load_geneformer_dictionaries
from scforge.genes.vocab import GeneVocab

BUILTIN_VOCABS = ("scgpt-human", "geneformer-v1", "geneformer-v2")
_SCGPT_SPECIALS = {"pad": "<pad>", "cls": "<cls>", "eoc": "<eoc>"}
_GENEFORMER_ROLES = {"<pad>": "pad", "<mask>": "mask", "<cls>": "cls", "<eos>": "eos"}


def _table(name: str) -> Path:
    return Path(str(resources.files("scforge.genes") / "tables" / name))


@functools.cache
def _scgpt_human() -> GeneVocab:
    with gzip.open(_table("scgpt_human_vocab.txt.gz"), "rt") as f:
        genes = f.read().split("\n")[:-1]
    return GeneVocab(tokens=genes + list(_SCGPT_SPECIALS.values()), specials=dict(_SCGPT_SPECIALS), name="scgpt-human")


@functools.cache
def _geneformer(version: str) -> GeneformerDictionaries:
    table = pd.read_csv(_table(f"geneformer_{version.lower()}.tsv.gz"), sep="\t", keep_default_na=False)
    tokens = table["token"].astype(str).tolist()
    specials = {_GENEFORMER_ROLES[t]: t for t in tokens if t in _GENEFORMER_ROLES}
    vocab = GeneVocab(tokens=tokens, specials=specials, name=f"geneformer-{version.lower()}")
    has = table["median"].astype(str) != ""
    medians = dict(zip(table.loc[has, "token"].astype(str), table.loc[has, "median"].astype(np.float64)))
    return GeneformerDictionaries(vocab=vocab, medians=medians, name_to_id=None, ensembl_mapping=None, version=version)


def builtin_vocab(name: str) -> GeneVocab:
    """A shipped vocabulary by name (see ``BUILTIN_VOCABS``)."""
    if name == "scgpt-human":
        return _scgpt_human()
    if name in ("geneformer-v1", "geneformer-v2"):
        return _geneformer(name[-2:].upper()).vocab
    raise VocabularyError(f"No built-in vocabulary {name!r}; built-in ones are {', '.join(BUILTIN_VOCABS)}.")


def builtin_geneformer(name: str) -> GeneformerDictionaries:
    """Shipped Geneformer token dictionary and medians (``geneformer-v1`` or ``geneformer-v2``)."""
    if name not in ("geneformer-v1", "geneformer-v2"):
        raise VocabularyError(f"No built-in Geneformer dictionaries {name!r}; use geneformer-v1 or geneformer-v2.")
    return _geneformer(name[-2:].upper())


def resolve_vocab(spec: str | Path | GeneVocab) -> GeneVocab:
    """A vocabulary from a built-in name, a vocab file, a Geneformer dictionary folder or an scGPT
    checkpoint folder (its ``vocab.json``)."""
    if isinstance(spec, GeneVocab):
        return spec
    if isinstance(spec, str) and spec in BUILTIN_VOCABS:
        return builtin_vocab(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / "vocab.json").exists():
            return GeneVocab.from_scgpt_json(path / "vocab.json")
        return load_geneformer_dictionaries(path).vocab
    if not path.exists():
        raise VocabularyError(
            f"Vocabulary {str(spec)!r} is neither a file, a folder nor a built-in name "
            f"({', '.join(BUILTIN_VOCABS)})."
        )
    return GeneVocab.from_file(path)


def resolve_geneformer(spec: str | Path | GeneformerDictionaries) -> GeneformerDictionaries:
    """Geneformer dictionaries from a built-in name or a dictionary folder / token dictionary file."""
    if isinstance(spec, GeneformerDictionaries):
        return spec
    if isinstance(spec, str) and spec in ("geneformer-v1", "geneformer-v2"):
        return builtin_geneformer(spec)
    return load_geneformer_dictionaries(spec)
