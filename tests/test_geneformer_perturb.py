"""In-silico perturbation: sequences as InSilicoPerturber builds them, shifts against direct embeddings, stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge.errors import ConfigError, InputDataError
from scforge.models.geneformer import GeneformerConfig
from scforge.models.geneformer.api import Geneformer
from scforge.models.geneformer.perturb import (
    benjamini_hochberg,
    in_silico_perturb,
    perturbation_stats,
    perturbed_sequence,
    random_expressed_genes,
)
from scforge.tokenize.ragged import TokenizedCells

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def v2(ifnb_small):
    model = Geneformer.new(GeneformerConfig.v2_104m(**TINY), "geneformer-v2", seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights far from the initialisation, so that embeddings depend on the input
        for name, p in model.module.named_parameters():
            if "norm" not in name.lower():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model, model.tokenize(ifnb_small[:12].copy())


def test_perturbed_sequences(v2):
    model, _ = v2
    seq = np.array([2, 10, 11, 12, 13, 3])
    np.testing.assert_array_equal(perturbed_sequence(model, seq, np.array([12]), "delete", 6), [2, 10, 11, 13, 3])
    np.testing.assert_array_equal(perturbed_sequence(model, seq, np.array([12]), "overexpress", 6),
                                  [2, 12, 10, 11, 13, 3])
    # absent gene: inserted after <cls>, the lowest-ranked gene falls off to keep the input size
    np.testing.assert_array_equal(perturbed_sequence(model, seq, np.array([99]), "overexpress", 6),
                                  [2, 99, 10, 11, 12, 3])
    v1 = Geneformer.new(GeneformerConfig.v1_10m(**TINY), "geneformer-v1")
    np.testing.assert_array_equal(perturbed_sequence(v1, np.array([10, 11, 12]), np.array([12]), "overexpress", 3),
                                  [12, 10, 11])


def test_delete_matches_direct_embeddings(v2):
    model, cells = v2
    gene = model.vocab.token(int(cells.cell(0)[0][5]))  # the 5th-ranked gene of cell 0
    result = in_silico_perturb(model, cells, [gene], gene_shifts=True, cells=[0, 1, 2, 3])
    shifts = result.cell_shifts
    assert set(shifts["perturbed"]) == {gene}
    for _, row in shifts.iterrows():
        seq = cells.cell(int(row["cell_index"]))[0]
        new = seq[seq != model.vocab.lookup([gene])[0]]
        both = TokenizedCells.concat([cells.select([int(row["cell_index"])]),
                                      TokenizedCells(offsets=np.array([0, new.size]), gene_ids=new.astype(np.int32),
                                                     values=None, obs_names=np.array(["p"]), meta=cells.meta)])
        a, b = model.embed_cells(both)
        assert row["cosine_similarity"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)
    genes = result.gene_shifts
    first = genes[genes["cell_index"] == 0]
    assert len(first) == cells.lengths[0] - 3 and gene not in set(first["affected_gene"])
    assert genes["cosine_similarity"].between(-1.0001, 1.0001).all()


def test_overexpress_combined_and_stats(v2):
    model, cells = v2
    ids = random_expressed_genes(cells, 3, seed=1)
    assert ids.size == 3 and np.all(ids > 3)
    names = [model.vocab.token(int(i)) for i in ids]
    combined = in_silico_perturb(model, cells, names, perturb_type="overexpress", combine=True)
    assert len(combined.cell_shifts) == cells.n_cells and combined.cell_shifts["perturbed"].nunique() == 1
    assert (combined.cell_shifts["cosine_similarity"] < 1).all()
    single = in_silico_perturb(model, cells, names, perturb_type="delete")
    null = in_silico_perturb(model, cells, [model.vocab.token(int(i)) for i in random_expressed_genes(
        cells, 5, seed=2, exclude=ids)])
    stats = perturbation_stats(single, null)
    assert set(stats.index) <= set(names) and {"p_value", "fdr", "cosine_sim_mean", "n_cells"} <= set(stats.columns)
    counts = single.cell_shifts.groupby("perturbed").size()
    assert (stats["n_cells"] == counts[stats.index]).all()
    assert (stats["fdr"] >= stats["p_value"]).all()
    plain = perturbation_stats(single)
    assert plain["shift_mean"].is_monotonic_decreasing
    everything = in_silico_perturb(model, cells, None, cells=[0])  # every gene of cell 0, one at a time
    assert len(everything.cell_shifts) == cells.lengths[0] - 2


def test_errors(v2):
    model, cells = v2
    with pytest.raises(ConfigError, match="perturb_type"):
        in_silico_perturb(model, cells, ["CD74"], perturb_type="inhibit")
    absent = model.vocab.token(int(np.setdiff1d(np.arange(4, 20_000), cells.gene_ids)[0]))
    with pytest.raises(InputDataError, match="nothing to perturb"):
        in_silico_perturb(model, cells, [absent])


def test_benjamini_hochberg():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.16 / 3, 0.16 / 3, 0.2])  # by hand
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(0).random(50) ** 3
    np.testing.assert_allclose(benjamini_hochberg(rng), false_discovery_control(rng))
