"""Shared helpers for the scBERT tests (no tests here): a gene panel of real ifnb genes, tokenized
real cells, a random gene2vec table, and reference ``performer_pytorch.PerformerLM`` models saved in
scBERT's published ``.pth`` layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

PANEL_SIZE = 299  # + the trailing zero position = 300 positions


def panel_from(adata, size: int = PANEL_SIZE) -> list[str]:
    """``size`` real genes spread over the expression range (every 8th of the 8*size most expressed),
    so the tokens use every bin 0..5."""
    totals = np.asarray(adata.X.sum(0)).ravel()
    ranked = np.argsort(-totals, kind="stable")[: 8 * size : 8]
    return [str(g) for g in adata.var_names[ranked]]


def random_gene2vec(n_genes: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_genes, dim)).astype(np.float32)


@pytest.fixture(scope="module")
def ifnb_cells(ifnb_small):
    """200 real cells (raw counts; a copy) and the panel."""
    adata = ifnb_small[::10].copy()
    return adata, panel_from(ifnb_small)


@pytest.fixture(scope="module")
def ifnb_tokens(ifnb_cells) -> np.ndarray:
    from scforge.tokenize import LogBinTokenizer

    adata, panel = ifnb_cells
    cells = LogBinTokenizer(panel).tokenize(adata)
    return cells.values.reshape(cells.n_cells, len(panel) + 1).astype(np.int64)


def reference_lm(*, dim: int = 32, depth: int = 2, heads: int = 2, dim_head: int = 64, nb_features: int = 24,
                 seq_len: int = PANEL_SIZE + 1, gene2vec: np.ndarray | None = None, seed: int = 0):
    """performer-pytorch's ``PerformerLM`` configured as scBERT's (absolute positions = gene2vec + a zero
    row, no bias on q/k/v, bias on the attention output), in eval mode."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # performer-pytorch's distutils / torch.cuda.amp deprecations
        from performer_pytorch import PerformerLM

        ref = PerformerLM(num_tokens=7, max_seq_len=seq_len, dim=dim, depth=depth, heads=heads, dim_head=dim_head,
                          nb_features=nb_features, rotary_position_emb=False, axial_position_emb=False,
                          qkv_bias=False, attn_out_bias=True)
    if gene2vec is not None:
        table = np.concatenate([gene2vec, np.zeros((1, dim), dtype=gene2vec.dtype)])
        with torch.no_grad():
            ref.pos_emb.emb.weight.copy_(torch.from_numpy(table))
    return ref.eval()


class PublishedHead(torch.nn.Module):
    """scBERT's fine-tuning head as ``finetune.py`` defines it (the test's oracle)."""

    def __init__(self, dim: int, seq_len: int, n_classes: int, h_dim: int = 128):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 1, (1, dim))
        self.fc1 = torch.nn.Linear(seq_len, 512)
        self.fc2 = torch.nn.Linear(512, h_dim)
        self.fc3 = torch.nn.Linear(h_dim, n_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x[:, None, :, :])).view(x.shape[0], -1)
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.fc3(x)


def published_state(ref) -> dict[str, torch.Tensor]:
    """The reference's state dict in scBERT's layout: no ``proj_updater`` copies, the redraw counter at
    ``performer.calls_since_last_redraw``, gene2vec positions in float64 (as the original stores them)."""
    out = {}
    for key, value in ref.state_dict().items():
        if key.startswith("performer.proj_updater.instance."):
            continue
        if key == "performer.proj_updater.calls_since_last_redraw":
            key = "performer.calls_since_last_redraw"
        if key == "pos_emb.emb.weight":
            value = value.double()
        out[key] = value.clone()
    return out


def save_published(ref, path: Path, *, prefix: str = "", bare: bool = False) -> Path:
    """Write ``ref`` as scBERT's ``save_ckpt`` does: epoch, model/optimizer/scheduler states, losses."""
    state = {prefix + k: v for k, v in published_state(ref).items()}
    if bare:
        torch.save(state, path)
        return path
    params = [p for p in ref.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, 15)
    scheduler.step()
    torch.save({"epoch": 7, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(), "losses": 0.4321}, path)
    return path
