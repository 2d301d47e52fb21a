"""scCello model, tokenisation with <cls>, save/load, embed checks, collator and pre-training (tiny, real cells)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scforge.errors import CheckpointError, ConfigError, InputDataError
from scforge.models.sccello.api import ScCello, with_cls
from scforge.models.sccello.model import ScCelloModel
from scforge.models.sccello.training import (
    ScCelloCollator,
    ScCelloTrainingModule,
    cell_type_indices,
    pretrain,
)
from scforge.ontology import cell_type_relations, load_cell_ontology, map_labels
from scforge.tokenize.ragged import TokenizedCells
from scforge.train import TrainConfig

# parity with fp32 reference code: "auto" precision must not pick bf16 on a bf16-capable CPU
pytestmark = pytest.mark.usefixtures("fp32_auto")

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def cl(shared_data):
    return load_cell_ontology(shared_data / "genes/ontology/CL-ontology-v2026-03-26.json.zst")


@pytest.fixture(scope="module")
def small(ifnb_small):
    """120 real cells, every ifnb label with at least a few cells."""
    labels = ifnb_small.obs["seurat_annotations"].astype(str).to_numpy()
    picks = np.concatenate([np.flatnonzero(labels == t)[:10] for t in np.unique(labels)])
    return ifnb_small[np.sort(picks)].copy()


@pytest.fixture(scope="module")
def labelled(small, cl):
    mapping = map_labels(small.obs["seurat_annotations"], ontology=cl)
    return mapping.ids, mapping.cell_type_ids


def tiny_model(cell_types, seed=0):
    return ScCello.new(cell_types, seed=seed, **TINY)


def test_with_cls_prepends_the_token():
    cells = TokenizedCells(offsets=np.array([0, 2, 2, 5]), gene_ids=np.array([7, 8, 9, 10, 11], dtype=np.int32),
                           values=None, obs_names=np.array(["a", "b", "c"]))
    out = with_cls(cells, 99)
    assert out.offsets.tolist() == [0, 3, 4, 8]
    assert out.gene_ids.tolist() == [99, 7, 8, 99, 99, 9, 10, 11]
    assert out.meta["cls_id"] == 99


def test_vocab_config_and_tokens(small, labelled):
    model = tiny_model(labelled[1])
    c = model.config
    assert c.vocab_size == 25_427 and c.cls_token_id == 25_426 and len(model.vocab) == 25_427
    assert model.vocab.token(25_426) == "<cls>" and model.vocab.special_id("mask") == 1
    assert model.module.learned_centroid.shape == (13, 32)
    cells = model.tokenize(small, max_length=40)
    assert (cells.lengths == 40).all()
    starts = cells.offsets[:-1]
    assert (cells.gene_ids[starts] == 25_426).all()
    # after <cls> come the same genes, in the same order, as Geneformer V1's rank value encoding
    from scforge.genes.builtin import builtin_geneformer
    from scforge.tokenize import RankValueTokenizer

    plain = RankValueTokenizer(builtin_geneformer("geneformer-v1"), model_input_size=39).tokenize(small)
    np.testing.assert_array_equal(np.delete(cells.gene_ids, starts), plain.gene_ids)
    with pytest.raises(ConfigError):
        model.tokenize(small, max_length=65)


def test_embed_rows_in_input_order_and_leaves_adata_alone(small, labelled):
    model = tiny_model(labelled[1])
    data = small.copy()
    before = data.X.copy()
    emb = model.embed(data, max_length=32, batch_size=16)
    assert emb.shape == (small.n_obs, 32) and np.isfinite(emb).all()
    assert (data.X != before).nnz == 0 and "X_scCello" in data.obsm
    order = np.arange(small.n_obs)[::-1]
    flipped = model.embed(small[order].copy(), max_length=32, batch_size=7, key_added=None)
    np.testing.assert_allclose(flipped, emb[order], atol=1e-5)
    cells = model.tokenize(small, max_length=32)
    h = model.module.encode(torch.as_tensor(cells.pad()["genes"]), (~cells.pad()["padding_mask"]).long())
    padded = model.module.cell_outputs(h).detach().numpy()
    np.testing.assert_allclose(padded, emb, atol=1e-4)  # padded and packed paths agree


def test_embed_requires_raw_counts(small, labelled):
    model = tiny_model(labelled[1])
    logged = ad.AnnData(X=small.layers["lognorm"].copy(), var=small.var.copy(), obs=small.obs.copy())
    with pytest.raises(InputDataError, match="count"):
        model.embed(logged)
    empty = small[:3].copy()
    empty.X = sp.csr_matrix(empty.X.shape, dtype=np.float32)
    with pytest.raises(InputDataError, match="express no gene"):
        model.embed(empty)


def test_save_and_load_round_trip(tmp_path, small, labelled):
    model = tiny_model(labelled[1], seed=3)
    path = model.save(tmp_path / "sccello")
    again = ScCello.from_folder(path)
    assert again.config == model.config and again.source == str(path)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, again.module.state_dict()[k]), k
    np.testing.assert_allclose(again.embed(small[:10].copy(), max_length=32),
                               model.embed(small[:10].copy(), max_length=32), atol=1e-6)
    import json

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["family"] == "sccello" and cfg["config"]["cell_types"] == labelled[1]
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError):
        ScCello.from_folder(tmp_path / "other")


def test_collator_masks_like_geneformer_and_repeats(small, labelled):
    model = tiny_model(labelled[1])
    cells = model.tokenize(small, max_length=64)
    types = cell_type_indices(labelled[0], model.config.cell_types)
    collate = ScCelloCollator(cells, types, mask_id=1, cls_id=25_426, gene_id_range=(2, 25_426), seed=5)
    pairs = [(0, i) for i in range(0, 120, 2)]
    a, b = collate(pairs), collate(pairs)
    for k in ("input_ids", "labels", "cell_types"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(collate([(1, i) for i in range(0, 120, 2)])["labels"], a["labels"])
    packed = cells.pack(np.arange(0, 120, 2))
    original = packed["genes"]
    chosen = a["labels"] != -100
    starts = packed["cu_seqlens"][:-1].long()
    assert not chosen[starts].any()  # <cls> is never masked
    assert torch.equal(a["labels"][chosen], original[chosen])
    rate = chosen.float().mean().item()
    assert 0.12 < rate < 0.18
    masked_share = (a["input_ids"][chosen] == 1).float().mean().item()
    assert 0.7 < masked_share < 0.9
    assert torch.equal(a["input_ids"][~chosen], original[~chosen])
    assert a["cell_types"].tolist() == types[0:120:2].tolist()


def test_training_losses_and_ablation(small, labelled, cl):
    ids, types = labelled
    relations = cell_type_relations(cl, types)
    model = tiny_model(types)
    cells = model.tokenize(small, max_length=48)
    index = cell_type_indices(ids, types)
    index[:20] = -100  # some unlabelled cells
    collate = ScCelloCollator(cells, index, mask_id=1, cls_id=25_426, gene_id_range=(2, 25_426))
    batch = collate([(0, i) for i in range(40)])
    full = ScCelloTrainingModule(model.module, relations)
    total, parts = full.compute_losses(batch)
    assert set(parts) == {"mgp", "inter", "intra", "reg"}
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-4)
    assert all(torch.isfinite(v) and v.item() > 0 for v in parts.values())
    ablation = ScCelloTrainingModule(model.module, None, ontology_losses=False)
    assert set(ablation.compute_losses(batch)[1]) == {"mgp"}
    # unlabelled-only batch: ontology losses are 0, MGP is not
    only_unlabelled = collate([(0, i) for i in range(20)])
    _, parts = full.compute_losses(only_unlabelled)
    assert parts["inter"].item() == parts["intra"].item() == parts["reg"].item() == 0.0 and parts["mgp"].item() > 0
    # the corpus-restricted MGP vocabulary gives a smaller, different contrast over the same labels
    corpus = np.unique(cells.gene_ids[cells.gene_ids != 25_426])
    reduced = ScCelloTrainingModule(model.module, None, ontology_losses=False, mgp_candidates=corpus)
    model.module.eval()
    assert reduced.compute_losses(batch)[0].item() < ablation.compute_losses(batch)[0].item()
    with pytest.raises(ConfigError, match="relations"):
        ScCelloTrainingModule(model.module, None)
    with pytest.raises(ConfigError, match="same order"):
        ScCelloTrainingModule(model.module, cell_type_relations(cl, types[::-1]))


def test_pretrain_reduces_the_loss_and_repeats(small, labelled, cl):
    ids, types = labelled
    relations = cell_type_relations(cl, types)
    cfg = TrainConfig(max_epochs=2, batch_size=40, precision="fp32", progress=False, val_fraction=0.0, seed=1)

    def run():
        model = tiny_model(types, seed=0)
        cells = model.tokenize(small, max_length=24)
        before = ScCelloTrainingModule(model.module, relations)
        collate = ScCelloCollator(cells, cell_type_indices(ids, types), 1, 25_426, (2, 25_426), seed=9)
        batch = collate([(0, i) for i in range(small.n_obs)])
        model.module.eval()
        start = before.compute_losses(batch)[1]["intra"].item()
        pretrain(model, cells, ids, relations=relations, config=cfg, mgp_vocabulary="corpus")
        end = before.compute_losses(batch)[1]["intra"].item()
        return model, start, end

    model, start, end = run()
    assert end < start
    again, _, _ = run()
    for k, v in model.module.state_dict().items():
        assert torch.allclose(v, again.module.state_dict()[k]), k
    with pytest.raises(InputDataError, match="prototypes"):
        pretrain(model, model.tokenize(small, max_length=24), ["CL:0000000"] * small.n_obs, relations=relations,
                 config=cfg)


def test_model_module_shapes():
    from scforge.models.sccello.config import ScCelloConfig

    m = ScCelloModel(ScCelloConfig(cell_types=["CL:0000236"], **TINY))
    ids = torch.tensor([[25_426, 5, 6, 0]])
    out = m(ids, torch.tensor([[1, 1, 1, 0]]))
    assert out["hidden"].shape == (1, 4, 32) and out["token_outputs"].shape == (1, 4, 32)
    assert out["cell_outputs"].shape == (1, 32) and m.vocab_outputs().shape == (25_427, 32)
    with pytest.raises(ConfigError):
        ScCelloConfig(cell_types=["CL:1", "CL:1"])


def test_fine_tune_and_linear_probe_through_annotation_api(small, labelled, tmp_path):
    """scCello in the annotation task: a fine-tuned head learns two real cell types, predictions survive
    save/load, the caller's model is untouched; the linear probe reads the frozen cell embedding."""
    from scforge.tasks.annotate import Annotator, fine_tune, linear_probe

    _, cl_ids = labelled
    model = tiny_model(sorted({t for t in cl_ids if t}))
    keep = small.obs["seurat_annotations"].isin(["CD14 Mono", "B"]).to_numpy()
    adata = small[keep].copy()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    ann = fine_tune(model, adata, "seurat_annotations", epochs=6, batch_size=8, lr=3e-3, max_length=64,
                    precision="fp32", progress=False, val_fraction=0.0, seed=0)
    proba = ann.predict(adata, progress=False)
    assert proba.shape == (adata.n_obs, 2)
    np.testing.assert_allclose(proba.to_numpy().sum(1), 1, atol=1e-5)
    truth = adata.obs["seurat_annotations"].astype(str).to_numpy()
    assert (proba.idxmax(axis=1).to_numpy() == truth).mean() >= 0.9  # monocytes and B cells are easy
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    backend = ann.model.annotation_backend()
    assert backend.n_classes == 2 and backend.embedding_dim == TINY["hidden_size"]
    assert "classifier.weight" in ann.model.module.state_dict()
    ann.save(tmp_path / "ann")
    again = Annotator.load(tmp_path / "ann")
    np.testing.assert_allclose(again.predict(adata, progress=False).to_numpy(), proba.to_numpy(), atol=1e-6)

    # the probe is logistic regression on the model's own frozen, L2-normalised cell embeddings
    from sklearn.linear_model import LogisticRegression

    probe = linear_probe(model, adata, "seurat_annotations", max_length=64, val_fraction=0.0, progress=False,
                         precision="fp32", C=100.0)
    emb = model.embed(adata, max_length=64, key_added=None, precision="fp32")
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    y = (truth == probe.classes[1]).astype(int)
    expected = LogisticRegression(C=100.0, max_iter=1000, random_state=0).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(probe.predict(adata, progress=False).to_numpy(), expected, atol=1e-6)


def test_classification_head_needs_two_classes():
    with pytest.raises(ConfigError, match="num_labels"):
        ScCello.new([], num_labels=1, **TINY)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        tiny_model([]).annotation_backend().classifier_copy(1, 0, "test")
