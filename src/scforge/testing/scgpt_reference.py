"""Import scGPT's own preprocessing and tokenizer functions from the installed `scgpt` wheel.

The wheel's package ``__init__`` imports torchtext, flash-attn-era models and more; none of that is
needed for ``scgpt.preprocess`` and ``scgpt.tokenizer.gene_tokenizer``. We register a bare package
module (same path, a quiet logger) and a minimal ``torchtext.vocab`` stand-in so exactly those two
modules import unchanged. Used by parity tests and benchmarks only.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scforge.errors import DependencyError


@dataclass(frozen=True)
class ScGPTReference:
    """The reference functions used for parity checks."""

    preprocess: types.ModuleType
    gene_tokenizer: types.ModuleType

    @property
    def Preprocessor(self) -> Any:  # noqa: N802 - mirrors the reference name
        return self.preprocess.Preprocessor

    @property
    def binning(self) -> Any:
        return self.preprocess.binning

    @property
    def tokenize_and_pad_batch(self) -> Any:
        return self.gene_tokenizer.tokenize_and_pad_batch

    @property
    def random_mask_value(self) -> Any:
        return self.gene_tokenizer.random_mask_value


class _VocabStandIn(dict):
    """Enough of a vocabulary for ``pad_batch``/``tokenize_and_pad_batch`` (``vocab[token]``)."""


def _install_stubs(package_dir: Path) -> None:
    if "scgpt" not in sys.modules or not hasattr(sys.modules["scgpt"], "_scforge_stub"):
        pkg = types.ModuleType("scgpt")
        pkg.__path__ = [str(package_dir)]  # type: ignore[attr-defined]
        logger = logging.getLogger("scGPT")
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        pkg.logger = logger  # type: ignore[attr-defined]
        pkg._scforge_stub = True  # type: ignore[attr-defined]
        sys.modules["scgpt"] = pkg
    if "torchtext" not in sys.modules:
        torchtext = types.ModuleType("torchtext")
        vocab_mod = types.ModuleType("torchtext.vocab")

        class Vocab:  # minimal base class; the reference subclasses it
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

        vocab_mod.Vocab = Vocab  # type: ignore[attr-defined]
        vocab_mod.vocab = lambda *a, **k: None  # type: ignore[attr-defined]
        torchtext.vocab = vocab_mod  # type: ignore[attr-defined]
        sys.modules["torchtext"] = torchtext
        sys.modules["torchtext.vocab"] = vocab_mod


def load_scgpt_reference() -> ScGPTReference:
    """Return scGPT's ``preprocess`` and ``gene_tokenizer`` modules from the installed wheel."""
    stub = sys.modules.get("scgpt")
    if stub is not None and getattr(stub, "_scforge_stub", False):
        return ScGPTReference(
            preprocess=importlib.import_module("scgpt.preprocess"),
            gene_tokenizer=importlib.import_module("scgpt.tokenizer.gene_tokenizer"),
        )
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(
            "The reference `scgpt` wheel is not installed; it is needed only for parity tests and "
            "benchmarks. Install it with `pip install --no-deps scgpt==0.2.4` (make test does this)."
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    _install_stubs(package_dir)
    preprocess = importlib.import_module("scgpt.preprocess")
    gene_tokenizer = importlib.import_module("scgpt.tokenizer.gene_tokenizer")
    return ScGPTReference(preprocess=preprocess, gene_tokenizer=gene_tokenizer)


def load_scgpt_model_module() -> types.ModuleType:
    """scGPT's ``scgpt.model.model`` (``TransformerModel`` and its parts) without the package
    ``__init__`` files (which pull in torchtext, GEARS and more). flash-attn is not needed: the
    reference falls back to ``nn.TransformerEncoderLayer``, its PyTorch path."""
    load_scgpt_reference()  # installs the bare `scgpt` package
    package_dir = Path(sys.modules["scgpt"].__path__[0])  # type: ignore[attr-defined]
    if "scgpt.model" not in sys.modules or not hasattr(sys.modules["scgpt.model"], "_scforge_stub"):
        sub = types.ModuleType("scgpt.model")
        sub.__path__ = [str(package_dir / "model")]  # type: ignore[attr-defined]
        sub._scforge_stub = True  # type: ignore[attr-defined]
        sys.modules["scgpt.model"] = sub
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flash_attn is not installed"
        return importlib.import_module("scgpt.model.model")


def vocab_stand_in(mapping: dict[str, int]) -> _VocabStandIn:
    """A dict usable as the reference's ``vocab`` argument."""
    return _VocabStandIn(mapping)


def load_scgpt_generation_module() -> types.ModuleType:
    """scGPT's ``scgpt.model.generation_model`` (``TransformerGenerator``). Its only other import,
    ``scgpt.utils.map_raw_id_to_vocab_id``, comes from a package whose ``__init__`` needs IPython and
    more; a bare ``scgpt.utils`` with the wheel's own ``util`` module stands in, unless the real one is
    already imported."""
    load_scgpt_model_module()
    package_dir = Path(sys.modules["scgpt"].__path__[0])  # type: ignore[attr-defined]
    if "scgpt.utils" not in sys.modules:
        sub = types.ModuleType("scgpt.utils")
        sub.__path__ = [str(package_dir / "utils")]  # type: ignore[attr-defined]
        sub._scforge_stub = True  # type: ignore[attr-defined]

        def map_raw_id_to_vocab_id(raw_ids: Any, gene_ids: Any) -> Any:
            """The wheel's mapping of dataset gene positions to vocabulary ids (same semantics)."""
            import numpy as np
            import torch

            if isinstance(raw_ids, torch.Tensor):
                return torch.as_tensor(np.asarray(gene_ids)[raw_ids.cpu().numpy()], device=raw_ids.device)
            return np.asarray(gene_ids)[np.asarray(raw_ids)]

        sub.map_raw_id_to_vocab_id = map_raw_id_to_vocab_id  # type: ignore[attr-defined]
        sys.modules["scgpt.utils"] = sub
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("scgpt.model.generation_model")
