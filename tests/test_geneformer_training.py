"""Geneformer training: MLM collator rules, loss going down on real cells, reproducibility, fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge.models.geneformer import GeneformerConfig
from scforge.models.geneformer.api import Geneformer
from scforge.models.geneformer.training import (
    IGNORE_INDEX,
    GeneformerMLMCollator,
    GeneformerMLMModule,
    pretrain_geneformer,
)
from scforge.train import TrainConfig

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def v2(ifnb_small):
    model = Geneformer.new(GeneformerConfig.v2_104m(**TINY), "geneformer-v2", seed=0)
    cells = model.tokenize(ifnb_small[:160].copy(), max_length=256)
    return model, cells


def test_collator_masks_like_hf(v2):
    model, cells = v2
    collate = GeneformerMLMCollator.for_model(model, cells, seed=3)
    items = [(0, i) for i in range(64)]
    batch = collate(items)
    again = collate(items)
    assert all(torch.equal(batch[k], again[k]) for k in ("input_ids", "labels"))  # seeded per batch
    assert not torch.equal(collate([(1, i) for i in range(64)])["labels"], batch["labels"])  # new epoch, new draw
    original = torch.from_numpy(cells.select(np.arange(64)).gene_ids.astype(np.int64))
    labels, inputs = batch["labels"], batch["input_ids"]
    selected = labels != IGNORE_INDEX
    special = torch.isin(original, torch.tensor([0, 1, 2, 3]))
    assert not (selected & special).any()  # <pad>/<mask>/<cls>/<eos> never selected
    assert torch.equal(inputs[special], original[special])
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(inputs[~selected], original[~selected])
    rate = selected.sum() / (~special).sum()
    assert 0.13 < float(rate) < 0.17
    masked = (inputs[selected] == 1).float().mean()
    unchanged = (inputs[selected] == original[selected]).float().mean()
    assert 0.76 < float(masked) < 0.84 and 0.07 < float(unchanged) < 0.14
    assert not torch.isin(inputs[selected & (inputs != 1)], torch.tensor([0, 2, 3])).any()
    assert batch["cu_seqlens"][-1] == inputs.numel()


def _loss(model, cells):
    collate = GeneformerMLMCollator.for_model(model, cells, seed=99)
    batch = collate([(0, i) for i in range(cells.n_cells)])
    module = GeneformerMLMModule(model.module.eval())
    with torch.no_grad():
        return float(module.compute_losses(batch)[0])


def _pretrain(model, cells, epochs, max_steps=-1):
    from scforge.train import OptimConfig

    cfg = TrainConfig(max_epochs=epochs, max_steps=max_steps, batch_size=16, val_fraction=0.0, progress=False,
                      precision="fp32", seed=1, logger="none")
    trained, _ = pretrain_geneformer(cells, GeneformerConfig.v2_104m(**TINY), dictionaries=model.dictionaries,
                                     train=cfg, optim=OptimConfig(lr=5e-3, warmup_steps=2))
    return trained


@pytest.mark.slow
def test_mlm_loss_drops_on_real_cells(v2):
    model, cells = v2
    train, held_out = cells.select(np.arange(128)), cells.select(np.arange(128, 160))
    before = _loss(model, held_out)
    after = _loss(_pretrain(model, train, epochs=3), held_out)
    assert after < before - 0.5, (before, after)  # ln(20,275) = 9.9 at the start


def test_training_is_reproducible_and_learns(v2):
    model, cells = v2
    train = cells.select(np.arange(64))
    first, second = _pretrain(model, train, 1, max_steps=4), _pretrain(model, train, 1, max_steps=4)
    for (name, a), b in zip(first.module.state_dict().items(), second.module.state_dict().values()):
        assert torch.equal(a, b), name
    assert _loss(first, train) < _loss(Geneformer.new(first.config, "geneformer-v2", seed=1), train)


def test_fine_tune_through_annotation_api(v2, ifnb_small):
    from scforge.tasks.annotate import fine_tune

    model, _ = v2
    adata = ifnb_small[:160].copy()
    keep = adata.obs["seurat_annotations"].isin(["CD14 Mono", "CD4 Naive T"]).to_numpy()
    adata = adata[keep].copy()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    ann = fine_tune(model, adata, "seurat_annotations", epochs=2, batch_size=16, lr=1e-3, max_length=256,
                    precision="fp32", progress=False, val_fraction=0.0)
    proba = ann.predict(adata, key_added="pred")
    assert proba.shape == (adata.n_obs, 2)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    for k, v in model.module.state_dict().items():  # the caller's model is unchanged
        assert torch.equal(v, before[k])
    backend = ann.model.annotation_backend()
    assert backend.n_classes == 2 and backend.embedding_dim == 32
