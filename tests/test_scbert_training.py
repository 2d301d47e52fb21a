"""scBERT masked-token pretraining and the published fine-tuning recipe, on real ifnb cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge.models.scbert import ScBERT
from scforge.models.scbert.training import (
    MaskedTokenCollator,
    ScBERTPretrainingModule,
    finetune_frozen_prefixes,
    mask_counts,
    mask_tokens,
    pretrain,
)
from scforge.train import TrainConfig
from scbert_helpers import ifnb_cells, ifnb_tokens, random_gene2vec  # noqa: F401 - fixtures

TINY = {"dim": 16, "depth": 3, "heads": 2, "dim_head": 8, "nb_features": 12}


def _model(panel, seed=0, **extra) -> ScBERT:
    return ScBERT.new(panel, gene2vec=random_gene2vec(len(panel), 16, seed), seed=seed, **{**TINY, **extra})


def test_mask_counts_follow_torch_float32_arithmetic():
    eligible = np.arange(0, 3000)
    expected = (torch.from_numpy(eligible) * 0.15).ceil().long().numpy()  # as scBERT's get_mask_subset_with_prob
    assert (mask_counts(eligible, 0.15) == expected).all()
    assert mask_counts(np.array([100]), 0.15)[0] == 16  # float32(100 * 0.15) rounds up past 15


@pytest.mark.shared_data
def test_masking_rules_on_real_cells(ifnb_tokens):  # noqa: F811
    tokens = ifnb_tokens.copy()
    tokens[0, :5] = 6  # <mask> already present: never chosen
    inputs, targets = mask_tokens(tokens, np.random.default_rng(0))
    chosen = targets != 6
    eligible = (tokens != 0) & (tokens != 6)
    assert (chosen <= eligible).all()  # zeros and <mask> are never masked
    assert (chosen.sum(1) == mask_counts(eligible.sum(1), 0.15)).all()
    assert (targets[chosen] == tokens[chosen]).all()
    assert (inputs[~chosen] == tokens[~chosen]).all()
    replaced = (inputs == 6) & chosen
    assert (inputs[chosen & ~replaced] == tokens[chosen & ~replaced]).all()
    share = replaced.sum() / chosen.sum()
    assert 0.85 < share < 0.95  # replace_prob 0.9 (about 4,000 chosen positions)
    again = mask_tokens(tokens, np.random.default_rng(0))
    assert (again[0] == inputs).all() and (again[1] == targets).all()


@pytest.mark.shared_data
def test_collator_is_seeded_by_epoch_and_cells(ifnb_tokens):  # noqa: F811
    collate = MaskedTokenCollator(ifnb_tokens, seed=3)
    a, b = collate([(0, 4), (0, 9)]), collate([(0, 4), (0, 9)])
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(collate([(1, 4), (1, 9)])["targets"], a["targets"])


def _fixed_batch_loss(model: ScBERT, tokens: np.ndarray) -> float:
    batch = MaskedTokenCollator(tokens[:64], seed=123)([(0, i) for i in range(64)])
    module = ScBERTPretrainingModule(model.module)
    with torch.no_grad():
        return float(module.compute_losses(batch)[0])


@pytest.mark.shared_data
def test_pretraining_loss_drops_and_runs_repeat(ifnb_cells, ifnb_tokens):  # noqa: F811
    adata, panel = ifnb_cells
    cells = _model(panel).tokenizer().tokenize(adata[:120])
    runs = []
    for _ in range(2):
        model = _model(panel, feature_redraw_interval=10)
        first_features = model.module.performer.layers[0].self_attn.projection_matrix.clone()
        before = _fixed_batch_loss(model, ifnb_tokens)
        from scforge.train import OptimConfig

        result = pretrain(model, cells, optim=OptimConfig(lr=3e-3, warmup_steps=2),
                          config=TrainConfig(max_epochs=3, batch_size=12, val_fraction=0.1, seed=5, progress=False,
                                             precision="fp32"))
        runs.append((before, _fixed_batch_loss(model, ifnb_tokens), model, first_features, result))
    (before, after, model, first_features, result), (_, after2, model2, _, _) = runs
    assert after < 0.7 * before, (before, after)
    assert after == after2  # same seed, same run
    for p, q in zip(model.module.state_dict().values(), model2.module.state_dict().values()):
        assert torch.equal(p, q)
    # 27 steps with a redraw every 10: features changed, the same way in both runs
    assert not torch.equal(model.module.performer.layers[0].self_attn.projection_matrix, first_features)
    assert "val/mlm" in result.metrics and "val/accuracy" in result.metrics
    assert torch.equal(model.module.pos_emb.emb.weight, _model(panel).module.pos_emb.emb.weight)  # frozen


@pytest.mark.shared_data
def test_fine_tune_follows_the_published_recipe(ifnb_cells):  # noqa: F811
    from scforge.tasks.annotate import fine_tune

    adata, panel = ifnb_cells
    adata = adata[:120].copy()
    base = _model(panel)
    original = {k: v.clone() for k, v in base.module.state_dict().items()}
    assert finetune_frozen_prefixes(base.module) == ("token_emb.", "pos_emb.", "performer.layers.0.",
                                                     "performer.layers.2.")
    kwargs = {"epochs": 3, "batch_size": 12, "lr": 3e-3, "seed": 1, "progress": False, "precision": "fp32"}
    ann = fine_tune(base, adata, "seurat_annotations", **kwargs)
    tuned = ann.model
    assert isinstance(tuned, ScBERT) and tuned.config.n_classes == len(ann.classes)
    assert all(torch.equal(v, base.module.state_dict()[k]) for k, v in original.items())  # caller's model untouched
    state = tuned.module.state_dict()
    for key, value in original.items():
        if key.startswith(("token_emb.", "pos_emb.", "performer.layers.0.", "performer.layers.2.")):
            assert torch.equal(state[key], value), key
    assert not torch.equal(state["performer.layers.1.linear1.weight"], original["performer.layers.1.linear1.weight"])
    assert not torch.equal(state["norm.weight"], original["norm.weight"])
    # the loss on the training cells dropped from the freshly initialised classifier's
    backend = base.annotation_backend()
    cells = backend.tokenize(adata, None, backend.settings(None, 1), False)
    known = adata.obs["seurat_annotations"].notna().to_numpy()
    y = np.searchsorted(ann.classes, adata.obs["seurat_annotations"].astype(str).to_numpy()[known])
    start = backend.classifier_copy(len(ann.classes), 1, "start")

    def ce(model):
        p = model.proba_tokens(cells.select(np.flatnonzero(known)), precision="fp32")
        return float(-np.log(p[np.arange(y.size), y] + 1e-12).mean())

    assert ce(tuned) < ce(start) - 0.3, (ce(start), ce(tuned))


@pytest.mark.shared_data
def test_linear_probe_and_annotator_round_trip(ifnb_cells, tmp_path):  # noqa: F811
    from scforge.tasks.annotate import Annotator, linear_probe

    adata, panel = ifnb_cells
    adata = adata[:100].copy()
    ann = linear_probe(_model(panel), adata, "seurat_annotations", progress=False, precision="fp32")
    proba = ann.predict(adata.copy(), progress=False)
    ann.save(tmp_path / "ann")
    loaded = Annotator.load(tmp_path / "ann")
    assert np.allclose(loaded.predict(adata.copy(), progress=False), proba, atol=1e-6)
