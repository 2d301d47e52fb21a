"""scCello's four pre-training losses as pure tensor functions. Every logit is a cosine similarity
divided by the temperature ``tau`` (0.01 in scCello).

* :func:`masked_gene_prediction_loss` (L_MGP): contrastive MLM against the whole vocabulary.
* :func:`cell_type_coherence_loss` (L_Intra): cells against learned cell-type prototypes.
* :func:`prototype_regulariser` (L_Reg): MSE(affine_projection(prototype of the cell's type), z).
* :func:`ontology_alignment_loss` (L_Inter): ranking supervised contrastive loss over the
  ontology similarity levels, with the ancestor mask and the SimCSE self-positive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scforge.errors import ConfigError

__all__ = [
    "cell_type_coherence_loss", "masked_gene_prediction_loss", "ontology_alignment_loss", "prototype_regulariser",
    "scaled_unit",
]


def scaled_unit(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``normalise(x) / sqrt(tau)``: dot products of such vectors are ``cos / tau``."""
    if tau <= 0:
        raise ConfigError(f"tau must be > 0, got {tau}")
    return F.normalize(x.float(), dim=-1) / math.sqrt(tau)


def masked_gene_prediction_loss(token_outputs: torch.Tensor, vocab_outputs: torch.Tensor, labels: torch.Tensor,
                                tau: float = 0.01) -> torch.Tensor:
    """L_MGP: cross-entropy of ``cos(token_outputs, vocab_outputs) / tau`` against the true token id.

    ``token_outputs`` ``[..., H]``: the MLM head applied to the encoder outputs; ``vocab_outputs``
    ``[V, H]``: the same head applied to every input word embedding; ``labels`` ``[...]``: the true
    token id at masked positions, -100 elsewhere (ignored). Returns 0 when nothing is masked.
    """
    hidden = token_outputs.reshape(-1, token_outputs.shape[-1])
    flat = labels.reshape(-1)
    chosen = flat != -100
    if not bool(chosen.any()):
        return token_outputs.sum() * 0.0
    logits = scaled_unit(hidden[chosen], tau) @ scaled_unit(vocab_outputs, tau).T
    return F.cross_entropy(logits, flat[chosen])


def cell_type_coherence_loss(cell_outputs: torch.Tensor, prototypes: torch.Tensor, cell_types: torch.Tensor,
                             tau: float = 0.01) -> torch.Tensor:
    """L_Intra: cross-entropy of ``cos(cell, every prototype) / tau`` against the cell's type.

    ``cell_outputs`` ``[B, H]`` (the ``cell_cls`` head on ``<cls>``), ``prototypes`` ``[C, H]``,
    ``cell_types`` ``[B]`` prototype indices; -100 (unlabelled) is ignored.
    """
    labelled = cell_types != -100
    if not bool(labelled.any()):
        return cell_outputs.sum() * 0.0
    logits = scaled_unit(cell_outputs[labelled], tau) @ scaled_unit(prototypes, tau).T
    return F.cross_entropy(logits, cell_types[labelled])


def prototype_regulariser(cell_outputs: torch.Tensor, prototypes: torch.Tensor, cell_types: torch.Tensor,
                          projection: torch.nn.Module, tau: float = 0.01) -> torch.Tensor:
    """L_Reg: ``MSE(projection(h_c), z)`` with ``z``/``h_c`` the cell / its type's prototype,
    each normalised and divided by ``sqrt(tau)``; unlabelled cells (-100) are ignored."""
    labelled = cell_types != -100
    if not bool(labelled.any()):
        return cell_outputs.sum() * 0.0
    z = scaled_unit(cell_outputs[labelled], tau)
    h = scaled_unit(prototypes[cell_types[labelled]], tau)
    return F.mse_loss(projection(h).float(), z)


def ontology_alignment_loss(cell_outputs: torch.Tensor, second_outputs: torch.Tensor, cell_types: torch.Tensor,
                            levels: torch.Tensor, ancestor: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """L_Inter: scCello's ranking supervised contrastive loss within a batch.

    ``cell_outputs`` / ``second_outputs`` ``[B, H]``: two forward passes of the same cells with
    different dropout; ``cell_types`` ``[B]`` indices into ``levels`` ``[C, C]`` (integer similarity
    levels) and ``ancestor`` ``[C, C]`` (``ancestor[a, b]``: type ``b`` is an ancestor of ``a``);
    -100 marks unlabelled cells, which take no part.

    For anchor ``i`` with ``s_ij = levels[c_i, c_j]`` and each distinct level ``l`` of row ``i``
    above its minimum: positives ``{j : s_ij >= l}``, negatives ``{j : s_ij < l, c_j not an ancestor
    of c_i}``; each positive ``p`` adds ``CE([z_i.z_p, z_i.z_n for n in negatives], target p)``.
    ``z_i.z_i`` is replaced by ``z_i.z~_i`` (second pass). The loss is the mean over ``(i, l, p)``;
    a triple without negatives contributes 0. Returns 0 when no anchor has two levels.
    """
    keep = cell_types != -100
    z = scaled_unit(cell_outputs[keep], tau)
    z2 = scaled_unit(second_outputs[keep], tau)
    types = cell_types[keep]
    n = types.shape[0]
    if n == 0:
        return cell_outputs.sum() * 0.0
    logits = z @ z.T
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = torch.where(eye, (z * z2).sum(-1).diag_embed(), logits)
    sim = levels.to(z.device)[types][:, types]
    excluded = ancestor.to(z.device)[types][:, types]
    row_min = sim.min(dim=1, keepdim=True).values
    total = logits.new_zeros(())
    count = 0
    for level in torch.unique(sim).tolist():
        present = (sim == level).any(dim=1, keepdim=True) & (row_min < level)  # anchors that rank this level
        positive = (sim >= level) & present
        if not bool(positive.any()):
            continue
        negative = (sim < level) & ~excluded
        neg_lse = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
        per_pair = torch.logaddexp(logits, neg_lse) - logits  # -log softmax of the positive
        total = total + per_pair[positive].sum()
        count += int(positive.sum())
    if count == 0:
        return cell_outputs.sum() * 0.0
    return total / count
