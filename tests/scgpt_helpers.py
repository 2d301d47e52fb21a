"""Shared helpers for the scGPT tests: reference models from the `scgpt` wheel and real tokens."""

from __future__ import annotations

import numpy as np
import torch

from scforge.genes.builtin import builtin_vocab
from scforge.models.scgpt import ScGPTConfig, ScGPTModel, to_scforge_keys
from scforge.tokenize import BinnedTokenizer

VOCAB = builtin_vocab("scgpt-human")
PAD_ID = VOCAB.special_id("pad")


def reference_model(**kwargs):
    """scGPT's own TransformerModel (PyTorch path), eval mode."""
    from scforge.testing.scgpt_reference import load_scgpt_model_module

    module = load_scgpt_model_module()
    args = {"ntoken": len(VOCAB), "d_model": 32, "nhead": 4, "d_hid": 48, "nlayers": 2, "vocab": {"<pad>": PAD_ID},
            "dropout": 0.2, "pad_token": "<pad>", "pad_value": -2}
    args.update(kwargs)
    return module.TransformerModel(**args).eval()


def scforge_twin(ref, **config) -> ScGPTModel:
    """An scforge model with the reference's weights."""
    base = {"vocab_size": len(VOCAB), "pad_token_id": PAD_ID, "d_model": 32, "n_heads": 4, "d_hid": 48,
            "n_layers": 2}
    base.update(config)
    model = ScGPTModel(ScGPTConfig(**base)).eval()
    result = model.load_state_dict(to_scforge_keys(ref.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def real_tokens(adata, n_cells: int = 6, max_len: int = 200, seed: int = 0, cls_value: float = -2.0):
    """Tokens of real cells (ragged) and the padded batch the reference takes."""
    tok = BinnedTokenizer(VOCAB, normalize_total=None, log1p=False, cls_value=cls_value, max_len=max_len, seed=seed)
    cells = tok.tokenize(adata[:n_cells])
    return cells, cells.pad(pad_id=PAD_ID, pad_value=-2.0)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= tol


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
