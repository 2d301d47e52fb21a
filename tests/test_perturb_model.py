"""scGPT's perturbation model and scGenePT's variants: parity with the reference, loading, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scforge.errors import ConfigError, GeneIdentityError
from scforge.genes import GeneVocab
from scforge.models.scgpt.perturbation import (
    MODEL_TYPES,
    PerturbConfig,
    ScGPTPerturbModel,
    config_from_state,
    published_to_scforge,
)
from scforge.tasks.perturb import PerturbationModel

GENES = [f"G{i}" for i in range(40)] + ["IFNB1", "ISG15"]


def _vocab() -> GeneVocab:
    return GeneVocab.from_gene_list(GENES, {"pad": "<pad>", "cls": "<cls>", "eoc": "<eoc>"})


def _reference(vocab: GeneVocab, **kwargs):
    from scforge.testing.scgpt_reference import load_scgpt_generation_module

    gm = load_scgpt_generation_module()
    torch.manual_seed(0)
    args = dict(ntoken=len(vocab), d_model=32, nhead=4, d_hid=48, nlayers=2, nlayers_cls=3, n_cls=1,
                vocab={"<pad>": vocab.special_id("pad")}, dropout=0.0, pad_token="<pad>", pad_value=0, pert_pad_id=0)
    args.update(kwargs)
    return gm.TransformerGenerator(**args).eval()


def _inputs(vocab: GeneVocab, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    genes = torch.as_tensor(vocab.lookup(GENES)).expand(n, -1)
    values = torch.rand(n, len(GENES), generator=g) * 4 * (torch.rand(n, len(GENES), generator=g) > 0.5)
    flags = torch.zeros(n, len(GENES), dtype=torch.long)
    flags[:, GENES.index("IFNB1")] = 1
    return genes, values, flags


def test_matches_reference_transformer_generator_outputs_and_gradients():
    vocab = _vocab()
    ref = _reference(vocab)
    cfg = PerturbConfig(vocab_size=len(vocab), pad_token_id=vocab.special_id("pad"), d_model=32, n_heads=4,
                        d_hid=48, n_layers=2)
    ours = ScGPTPerturbModel(cfg).eval()
    state = {k: v for k, v in published_to_scforge(ref.state_dict(), cfg).items() if not k.startswith("cls_decoder")}
    ours.load_state_dict(state, strict=True)
    genes, values, flags = _inputs(vocab)
    out_ref = ref(genes, values, flags, torch.zeros(genes.shape, dtype=torch.bool))["mlm_output"]
    out = ours(genes, values, flags)["pred"]
    assert torch.allclose(out, out_ref, atol=1e-5)
    out_ref.pow(2).mean().backward()
    out.pow(2).mean().backward()
    g_ref = ref.transformer_encoder.layers[0].linear1.weight.grad
    g = ours.transformer_encoder.layers[0].linear1.weight.grad
    assert torch.allclose(g, g_ref, atol=1e-5)
    # the perturbation flag changes the prediction, and flag 0 (= pert_pad_id) embeds to zero
    assert not torch.allclose(ours(genes, values, torch.zeros_like(flags))["pred"], out)
    assert torch.count_nonzero(ours.pert_encoder.weight[0]) == 0


def test_from_published_reads_generator_folder_and_gives_same_predictions(tmp_path):
    vocab = _vocab()
    ref = _reference(vocab)
    torch.save(ref.state_dict(), tmp_path / "best_model.pt")
    (tmp_path / "args.json").write_text(json.dumps({"embsize": 32, "nheads": 4, "d_hid": 48, "nlayers": 2}))
    vocab.to_scgpt_json(tmp_path / "vocab.json")
    model = PerturbationModel.from_published(tmp_path, GENES)
    assert model.config.decoder == "affine" and model.config.n_layers == 2 and not model.config.embedding_norm
    genes, values, flags = _inputs(vocab, n=2)
    want = ref(genes, values, flags, torch.zeros(genes.shape, dtype=torch.bool))["mlm_output"].detach().numpy()
    got = model.predict_cells(values.numpy(), ["IFNB1"], device="cpu", precision="fp32")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_scgenept_embedding_sum_layernorm_and_published_go_all_key():
    vocab = _vocab()
    rng = np.random.default_rng(0)
    text = {g: rng.normal(size=12).astype(np.float32) for g in GENES[:30]}
    model = PerturbationModel.new(vocab, GENES, model_type="scgenept_go_all", text_embeddings={"go_all": text},
                                  d_model=32, n_heads=4, d_hid=48, n_layers=2)
    m = model.module.eval()
    assert m.config.embedding_norm and m.config.decoder == "expr" and m.config.text_dims == (12,)
    table = m.gopt_encoder_all.embedding.weight.detach().numpy()
    ids = vocab.lookup(GENES)
    np.testing.assert_allclose(table[ids[0]], text[GENES[0]])  # initialised from the text vector
    missing = table[ids[35]]  # no text: Uniform(-0.1, 0.1)
    assert np.abs(missing).max() <= 0.1 and np.abs(missing).max() > 0
    assert np.all(table[vocab.special_id("pad")] == 0)
    genes, values, flags = _inputs(vocab, n=2)
    with torch.no_grad():
        want = m.ln(m.encoder(genes) + m.value_encoder(values) + m.gopt_encoder_all(genes) + m.pert_encoder(flags))
        torch.testing.assert_close(m.embed(genes, values, flags), want)
        gopt = m.gopt_encoder_all
        manual = gopt.enc_norm(gopt.fc(gopt.embedding(genes)))
        torch.testing.assert_close(gopt(genes), manual)
    # scGenePT's files keep the GO-all encoder under gopt_encoder_f: loading renames it
    published = {k.replace("gopt_encoder_all.", "gopt_encoder_f."): v for k, v in m.state_dict().items()}
    cfg = config_from_state(published_to_scforge(published, m.config), vocab_size=len(vocab),
                            pad_token_id=vocab.special_id("pad"), n_heads=4)
    assert cfg.text_sources == ("go_all",) and cfg.embedding_norm and cfg.decoder == "expr"
    again = ScGPTPerturbModel(cfg)
    again.load_state_dict(published_to_scforge(published, cfg), strict=True)


def test_every_published_model_type_builds():
    vocab = _vocab()
    text = {g: np.ones(8, dtype=np.float32) * i for i, g in enumerate(GENES)}
    for model_type in [*MODEL_TYPES, "scgenept_go_c_no_attention"]:
        sources = MODEL_TYPES[model_type.removesuffix("_no_attention")]["text_sources"]
        model = PerturbationModel.new(vocab, GENES, model_type=model_type,
                                      text_embeddings={s: text for s in sources}, d_model=16, n_heads=2, d_hid=16,
                                      n_layers=1)
        assert model.config.text_sources == tuple(sources)
        assert hasattr(model.module, "encoder") == MODEL_TYPES[model_type.removesuffix("_no_attention")][
            "use_token_embedding"]
        out = model.predict_cells(np.ones((2, len(GENES)), np.float32), ["ISG15"], device="cpu")
        assert out.shape == (2, len(GENES)) and np.isfinite(out).all()


def test_from_pretrained_copies_backbone_only():
    import scforge

    default = scforge.load("default")
    genes = ["IFNB1", "ISG15", "IFIT1", "MX1", "CD3E", "LYZ", "NOT_A_GENE"]
    model = PerturbationModel.from_pretrained(default, genes)
    src = default.module.state_dict()
    own = model.module.state_dict()
    for key in ("encoder.embedding.weight", "value_encoder.linear1.weight",
                "transformer_encoder.layers.3.self_attn.Wqkv.weight"):
        assert torch.equal(own[key], src[key]), key
    assert model.load_summary.genes_in_vocab == 6 and model.gene_ids[-1] == default.vocab.special_id("pad")
    assert "decoder.coeff_decoder.fc.0.weight" not in model.load_summary.loaded
    no_attention = PerturbationModel.from_pretrained(default, genes, load_transformer=False)
    key = "transformer_encoder.layers.0.linear1.weight"
    assert not torch.equal(no_attention.module.state_dict()[key], src[key])
    assert torch.equal(no_attention.module.state_dict()["encoder.embedding.weight"], src["encoder.embedding.weight"])
    with pytest.raises(ConfigError, match="architecture"):
        PerturbationModel.from_pretrained(default, genes, d_model=64)


def test_bad_inputs_raise_clear_errors():
    vocab = _vocab()
    model = PerturbationModel.new(vocab, GENES, d_model=16, n_heads=2, d_hid=16, n_layers=1)
    with pytest.raises(GeneIdentityError, match="NOPE"):
        model.predict_cells(np.zeros((1, len(GENES)), np.float32), ["NOPE"])
    with pytest.raises(ConfigError, match="values must be"):
        model.predict_cells(np.zeros((1, 3), np.float32), ["IFNB1"])
    with pytest.raises(ConfigError, match="model_type"):
        PerturbationModel.new(vocab, GENES, model_type="scgenept_wiki")
    with pytest.raises(ConfigError, match="text embeddings for"):
        PerturbationModel.new(vocab, GENES, model_type="scgenept_go_c")
    with pytest.raises(GeneIdentityError, match="none of the vocabulary"):
        PerturbationModel.new(vocab, GENES, model_type="scgenept_go_c", text_embeddings={"go_c": {"XYZ": [1.0]}})


# ---- end to end on a GEARS-layout file built from real ifnb cells --------------------------------
@pytest.fixture(scope="module")
def gears_data(ifnb_small, tmp_path_factory):
    from scforge.data.perturbation import read_gears
    from scforge.testing.perturbation import gears_layout_adata

    means = np.asarray(ifnb_small.layers["lognorm"].mean(axis=0)).ravel()
    genes = [str(g) for g in ifnb_small.var_names[np.argsort(-means, kind="stable")[60:66]]]
    adata = gears_layout_adata(ifnb_small, singles=genes, combos=[(genes[0], genes[1]), (genes[2], genes[3])],
                               n_ctrl=120, n_per_condition=24, seed=0, n_genes=48, n_targets=10)
    path = tmp_path_factory.mktemp("gears") / "perturb_processed.h5ad"
    adata.write_h5ad(path)
    return read_gears(path)


def _small(data, **kw) -> PerturbationModel:
    return PerturbationModel.new(None, data.gene_names, d_model=32, n_heads=4, d_hid=48, n_layers=2, **kw)


def test_fit_learns_perturbation_effects_and_beats_no_change(gears_data):
    from scforge.metrics.perturbation import pearson_delta

    data = gears_data
    train = [c for c in data.conditions if "+ctrl" in c]
    val = [train.pop()]
    test = [c for c in data.conditions if "+ctrl" not in c]
    model = _small(data, seed=0).fit(data, train=train, val=val, epochs=12, lr=3e-3, batch_size=32, seed=0,
                                     max_seq_len=32)
    losses = [h["train/loss_epoch"] for h in model.history if "train/loss_epoch" in h]
    assert len(losses) >= 3 and losses[-1] < 0.7 * losses[0]
    preds = model.predict(data, train + test, pool_size=60, seed=0)
    untrained = _small(data, seed=0).predict(data, train, pool_size=60, seed=0)
    control = data.profiles().control_mean(None)

    def score(p):  # trained perturbations: the learned effect points the observed way on the DE genes
        return np.mean([pearson_delta(p[(c, None)], data.profiles([(c, None)]).means[(c, None)], control,
                                      data.de_genes(c, n=20)) for c in train])

    assert score(preds) > 0.3 and score(preds) > score(untrained) + 0.2
    again = _small(data, seed=0).fit(data, train=train, val=val, epochs=12, lr=3e-3, batch_size=32, seed=0,
                                     max_seq_len=32)
    np.testing.assert_allclose(again.predict(data, test, pool_size=60, seed=0)[(test[0], None)],
                               preds[(test[0], None)], rtol=1e-5, atol=1e-6)  # same seed, same model


def test_reverse_perturbation_ranks_the_observed_condition_first(gears_data):
    data = gears_data
    singles = [c for c in data.conditions if "+ctrl" in c]
    model = _small(data, seed=1).fit(data, train=singles, epochs=12, lr=3e-3, batch_size=32, seed=1)
    target = singles[0]
    observed = data.profiles([(target, None)]).means[(target, None)]
    table = model.rank_perturbations(data, observed, singles, pool_size=60)
    assert list(table.columns) == ["rank", "condition", "score"] and table["rank"].tolist() == list(range(1, 7))
    assert table["condition"].iloc[0] == target
    by_l2 = model.rank_perturbations(data, observed, singles, metric="l2", pool_size=60)
    assert by_l2["condition"].iloc[0] == target and by_l2["score"].is_monotonic_increasing


def test_save_and_load_round_trip(gears_data, tmp_path):
    import scforge

    data = gears_data
    model = _small(data, seed=2)
    model.save(tmp_path / "m")
    loaded = scforge.load(tmp_path / "m")
    assert isinstance(loaded, PerturbationModel) and list(loaded.genes) == list(model.genes)
    cond = data.conditions[0]
    a = model.predict(data, [cond], pool_size=20)[(cond, None)]
    b = loaded.predict(data, [cond], pool_size=20)[(cond, None)]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_fit_and_predict_errors(gears_data):
    data = gears_data
    model = _small(data)
    with pytest.raises(ConfigError, match="nothing to train"):
        model.fit(data)
    with pytest.raises(ConfigError, match="not in the data"):
        model.predict(data, ["NOPE+ctrl"])
    other = PerturbationModel.new(None, ["A", "B"], d_model=16, n_heads=2, d_hid=16, n_layers=1)
    with pytest.raises(GeneIdentityError, match="not in the data"):
        other.predict(data, [data.conditions[0]])
