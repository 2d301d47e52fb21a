"""The building blocks of scGPT, equivalent to the reference ``scgpt.model.model`` modules.

Parameter names match the published state dicts (``encoder.embedding``, ``value_encoder.linear1``,
``decoder.fc.0``, ``mvc_decoder.gene2query``, ``cls_decoder._decoder.0``, ...). Decoders accept any
leading shape (padded ``[B, L, d]`` or packed ``[T, d]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm (also the batch-label and modality encoders)."""

    def __init__(self, num_embeddings: int, d_model: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(x))


BatchLabelEncoder = GeneEncoder


class ContinuousValueEncoder(nn.Module):
    """``clamp(x, max=512) -> Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm -> Dropout``."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: float = 512) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class CategoryValueEncoder(GeneEncoder):
    """Bin id embedding + LayerNorm (``input_emb_style="category"``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.long())


class DomainSpecificBatchNorm1d(nn.Module):
    """One BatchNorm1d per batch label (``bns.{k}``); scGPT applies the first label of a minibatch
    to all of it, so minibatches must hold one batch each (per-batch sampling)."""

    def __init__(self, d_model: int, num_domains: int, eps: float = 6.1e-5, affine: bool = False) -> None:
        super().__init__()
        self.bns = nn.ModuleList([nn.BatchNorm1d(d_model, eps=eps, affine=affine) for _ in range(num_domains)])

    def forward(self, x: torch.Tensor, domain: int) -> torch.Tensor:
        if not 0 <= domain < len(self.bns):
            raise ValueError(f"batch label {domain} outside 0..{len(self.bns) - 1}")
        return self.bns[domain](x)


class ExprDecoder(nn.Module):
    """Per-token expression (GEP/MLM) head, with optional zero-probability head."""

    def __init__(self, d_model: int, explicit_zero_prob: bool = False, use_batch_labels: bool = False) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(d_in, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model),
                                 nn.LeakyReLU(), nn.Linear(d_model, 1))

        self.fc = mlp()
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.zero_logit = mlp()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"pred": self.fc(x).squeeze(-1)}
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(x).squeeze(-1))
        return out


class _MLPHead(nn.Module):
    """``[Linear, act, LayerNorm] x (n_layers - 1)`` then ``out_layer`` (cls and DAR heads)."""

    def __init__(self, d_model: int, n_out: int, n_layers: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), activation(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class ClsDecoder(_MLPHead):
    """Cell classification head on the cell embedding."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int = 3) -> None:
        super().__init__(d_model, n_cls, n_layers, nn.ReLU)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.lambd * grad, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``-lambd`` backward."""
    return _GradReverse.apply(x, lambd)


class AdversarialDiscriminator(_MLPHead):
    """Batch discriminator behind a gradient-reversal layer (DAR)."""

    def __init__(self, d_model: int, n_batches: int, n_layers: int = 3, reverse_grad: bool = True) -> None:
        super().__init__(d_model, n_batches, n_layers, nn.LeakyReLU)
        self.reverse_grad = reverse_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(grad_reverse(x, 1.0) if self.reverse_grad else x)


class MVCDecoder(nn.Module):
    """Masked value prediction from the cell embedding (GEPC/MVC).

    ``cell_emb`` is ``[B, d_in]`` and ``gene_embs`` ``[B, L, d]`` (padded), or ``cell_emb`` already
    repeated per token ``[T, d_in]`` with ``gene_embs [T, d]`` (packed)."""

    def __init__(self, d_model: int, arch_style: str = "inner product", explicit_zero_prob: bool = False,
                 use_batch_labels: bool = False) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model
        if arch_style in ("inner product", "inner product, detach"):
            self.gene2query = nn.Linear(d_model, d_model)
            self.query_activation = nn.Sigmoid()
            self.W = nn.Linear(d_model, d_in, bias=False)
            if explicit_zero_prob:
                self.W_zero_logit = nn.Linear(d_model, d_in)
        elif arch_style in ("concat query", "sum query"):
            if explicit_zero_prob:
                raise ValueError(f"mvc_decoder_style={arch_style!r} has no zero-probability head (as in scGPT)")
            self.gene2query = nn.Linear(d_model, 64 if arch_style == "concat query" else d_model)
            self.query_activation = nn.Sigmoid()
            self.fc1 = nn.Linear(d_model + 64 if arch_style == "concat query" else d_model, 64)
            self.hidden_activation = nn.PReLU()
            self.fc2 = nn.Linear(64, 1)
        else:
            raise ValueError(f"Unknown MVC decoder style {arch_style!r}")
        self.arch_style = arch_style
        self.explicit_zero_prob = explicit_zero_prob

    def forward(self, cell_emb: torch.Tensor, gene_embs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.arch_style.endswith("detach"):
            gene_embs = gene_embs.detach()
        query = self.query_activation(self.gene2query(gene_embs))
        per_token = cell_emb.dim() == gene_embs.dim()
        if self.arch_style.startswith("inner product"):
            def project(w: nn.Module) -> torch.Tensor:
                if per_token:
                    return (w(query) * cell_emb).sum(-1)
                return torch.bmm(w(query), cell_emb.unsqueeze(2)).squeeze(2)

            out = {"pred": project(self.W)}
            if self.explicit_zero_prob:
                out["zero_probs"] = torch.sigmoid(project(self.W_zero_logit))
            return out
        cell = cell_emb if per_token else cell_emb.unsqueeze(1).expand(-1, gene_embs.shape[1], -1)
        if self.arch_style == "concat query":
            h = self.hidden_activation(self.fc1(torch.cat([cell, query], dim=-1)))
        else:
            h = self.hidden_activation(self.fc1(cell + query))
        return {"pred": self.fc2(h).squeeze(-1)}


def ecs_loss(cell_emb: torch.Tensor, threshold: float) -> torch.Tensor:
    """Elastic cell similarity: ``mean(1 - (relu(cos offdiag) - threshold)^2)`` (scGPT's ECS)."""
    normed = F.normalize(cell_emb, p=2, dim=1)
    cos = normed @ normed.t()
    cos = cos.masked_fill(torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device), 0.0)
    return torch.mean(1 - (F.relu(cos) - threshold) ** 2)
