"""The shipped default model loads offline, matches its recorded training settings and embeds real cells."""

from __future__ import annotations

import json

import numpy as np
import scanpy as sc

import scforge
from scforge.demo import recover_counts
from scforge.models import default_model_path


def test_default_model_loads_and_embeds():
    folder = default_model_path()
    model = scforge.load("default")
    info = json.loads((folder / "training.json").read_text())
    assert model.config.d_model == info["settings"]["d_model"] == 128
    assert model.config.n_layers == 4 and model.config.max_seq_len == 192
    assert (folder / "model.safetensors").stat().st_size < 15 * 2**20
    card = (folder / "card.md").read_text()
    assert "scripts/train_default_model.py" in card and "Held-out loss" in card
    assert info["metrics"]["val/gep"] < 203  # beats predicting each cell's mean bin (see the card)
    counts = recover_counts(sc.datasets.pbmc68k_reduced())[:30].copy()
    emb = model.embed(counts, progress=False)
    assert emb.shape == (30, 128) and np.all(np.isfinite(emb))
    assert np.array_equal(emb, model.embed(counts.copy(), progress=False))
