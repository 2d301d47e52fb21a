"""scCello's losses on tiny hand-checked inputs, and L_Inter against a loop-by-loop reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scforge.errors import ConfigError
from scforge.models.sccello.losses import (
    cell_type_coherence_loss,
    masked_gene_prediction_loss,
    ontology_alignment_loss,
    prototype_regulariser,
    scaled_unit,
)


def test_masked_gene_prediction_by_hand():
    tokens = torch.tensor([[[5.0, 5.0], [2.0, 0.0]]])  # [B=1, L=2, H]; only position 1 is masked
    vocab = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-1.0, 0.0]])
    labels = torch.tensor([[-100, 2]])
    # cosines [1, 0, -1] with tau = 1: CE to class 2 = 1 + log(e + 1 + 1/e)
    expected = 1 + math.log(math.e + 1 + math.exp(-1))
    assert masked_gene_prediction_loss(tokens, vocab, labels, tau=1.0).item() == pytest.approx(expected, rel=1e-6)
    # tau scales the logits: cos / 0.5
    expected_half = 2 + math.log(math.exp(2) + 1 + math.exp(-2))
    assert masked_gene_prediction_loss(tokens, vocab, labels, tau=0.5).item() == pytest.approx(expected_half, rel=1e-6)
    nothing = masked_gene_prediction_loss(tokens, vocab, torch.full((1, 2), -100))
    assert nothing.item() == 0.0


def test_cell_type_coherence_and_regulariser_by_hand():
    cells = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    types = torch.tensor([0, -100])  # the second cell is unlabelled: ignored
    # cosines 0.6 and 0.8, tau 0.1 -> logits 6 and 8; CE to type 0 = log(1 + e^2)
    loss = cell_type_coherence_loss(cells, prototypes, types, tau=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)
    # regulariser with the identity projection: mean((h - z)^2) / tau = ((0.4^2 + 0.8^2) / 2) / 0.1
    identity = torch.nn.Identity()
    reg = prototype_regulariser(cells, prototypes, types, identity, tau=0.1)
    assert reg.item() == pytest.approx(4.0, rel=1e-6)
    assert cell_type_coherence_loss(cells, prototypes, torch.tensor([-100, -100])).item() == 0.0


def test_ontology_alignment_two_cells_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    levels = torch.tensor([[3, 1], [1, 3]])
    none = torch.zeros(2, 2, dtype=torch.bool)
    # each anchor: one level above the minimum, positive = itself (z.z~ = 1), negative = the other (0)
    per_anchor = math.log(1 + math.exp(-1))
    loss = ontology_alignment_loss(z, z, torch.tensor([0, 1]), levels, none, tau=1.0)
    assert loss.item() == pytest.approx(per_anchor, rel=1e-6)
    # type 1 is an ancestor of type 0: anchor 0 has no negative (its triple counts 0), anchor 1 unchanged
    ancestor = torch.tensor([[False, True], [False, False]])
    loss = ontology_alignment_loss(z, z, torch.tensor([0, 1]), levels, ancestor, tau=1.0)
    assert loss.item() == pytest.approx(per_anchor / 2, rel=1e-6)
    # the self-pair uses the second pass: z~ = -z makes the positive logit -1
    loss = ontology_alignment_loss(z, -z, torch.tensor([0, 1]), levels, none, tau=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(1)), rel=1e-6)
    # one type only: no anchor has two levels
    assert ontology_alignment_loss(z, z, torch.tensor([0, 0]), levels, none).item() == 0.0


def reference_alignment(z, z2, types, levels, ancestor, tau):
    """Loop-by-loop transcription of the rule (B.2), for comparison."""
    keep = [i for i in range(len(types)) if types[i] != -100]
    zs, z2s = scaled_unit(z, tau), scaled_unit(z2, tau)
    losses = []
    for i in keep:
        s = {j: int(levels[types[i], types[j]]) for j in keep}
        for level in sorted(set(s.values())):
            if level == min(s.values()):
                continue
            positives = [j for j in keep if s[j] >= level]
            negatives = [j for j in keep if s[j] < level and not bool(ancestor[types[i], types[j]])]
            for p in positives:
                pos = (zs[i] @ z2s[i]) if p == i else (zs[i] @ zs[p])
                logits = torch.stack([pos] + [zs[i] @ zs[n] for n in negatives])
                losses.append(F.cross_entropy(logits[None], torch.tensor([0])))
    return torch.stack(losses).mean()


def test_ontology_alignment_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 8, generator=g)
    z2 = z + 0.1 * torch.randn(12, 8, generator=g)
    types = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, -100, 0, 2, 3])
    levels = torch.tensor([[9, 3, 1, 2], [3, 9, 2, 1], [1, 2, 10, 4], [2, 1, 4, 9]])
    ancestor = torch.zeros(4, 4, dtype=torch.bool)
    ancestor[1, 0] = ancestor[3, 2] = True
    ours = ontology_alignment_loss(z, z2, types, levels, ancestor, tau=0.01)
    ref = reference_alignment(z, z2, types, levels, ancestor, 0.01)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_losses_give_finite_gradients_and_check_tau():
    z = torch.randn(6, 4, requires_grad=True)
    levels = torch.tensor([[5, 1], [1, 5]])
    ancestor = torch.tensor([[False, True], [False, False]])  # some anchors have no negatives
    loss = ontology_alignment_loss(z, z.detach() * 1.01, torch.tensor([0, 0, 1, 1, 0, 1]), levels, ancestor)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        scaled_unit(z, 0.0)
