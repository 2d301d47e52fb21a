"""Tokenizers for the three input styles, on CSR chunks (never a dense whole matrix).

- :class:`BinnedTokenizer`: scGPT value bins (per-cell quantiles, ``<cls>`` first).
- :class:`RankValueTokenizer`: Geneformer rank value encoding (median-scaled, descending).
- :class:`LogBinTokenizer`: scBERT log2 bins over a fixed gene panel.

All return :class:`TokenizedCells` (ragged) and stream with ``iter_chunks`` for backed data.
"""

from scforge.tokenize.binned import BinnedTokenizer
from scforge.tokenize.hvg import select_hvg
from scforge.tokenize.logbins import LogBinTokenizer
from scforge.tokenize.masking import mask_values
from scforge.tokenize.ragged import TokenizedCells
from scforge.tokenize.rank import RankValueTokenizer

__all__ = [
    "BinnedTokenizer",
    "LogBinTokenizer",
    "RankValueTokenizer",
    "TokenizedCells",
    "mask_values",
    "select_hvg",
]
