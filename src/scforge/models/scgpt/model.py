"""scGPT as a pure torch module on the shared core (equivalent to the reference ``TransformerModel``).

Inputs come padded (``genes, values [B, L]``, ``padding_mask`` True = pad) as in the reference, or
packed (``genes, values [T]`` with ``cu_seqlens``), which skips padding entirely (inference and
training without the generative attention mask). Outputs follow the reference's dict keys:
``cell_emb``, ``mlm_output``, ``mlm_zero_probs``, ``mvc_output``, ``mvc_zero_probs``, ``cls_output``,
``loss_ecs``, ``loss_cce``, ``dab_output``; per-token outputs are ``[B, L]`` or ``[T]``.

Documented differences from the reference: ``avg-pool`` averages real tokens only (the reference
includes padding, so its result depends on what else is in the batch); in packed training, batch
norm statistics come from real tokens only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scforge.models.scgpt.config import ScGPTConfig
from scforge.models.scgpt.modules import (
    AdversarialDiscriminator,
    BatchLabelEncoder,
    CategoryValueEncoder,
    ClsDecoder,
    ContinuousValueEncoder,
    DomainSpecificBatchNorm1d,
    ExprDecoder,
    GeneEncoder,
    MVCDecoder,
    ecs_loss,
)
from scforge.nn import EncoderLayer, TransformerEncoder, segment_ids

BACKBONE_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")


class ScGPTModel(nn.Module):
    """scGPT transformer with its encoders, decoders and heads, configured by :class:`ScGPTConfig`."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = GeneEncoder(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        if c.input_emb_style == "continuous":
            self.value_encoder: nn.Module = ContinuousValueEncoder(c.d_model, c.dropout)
        elif c.input_emb_style == "category":
            self.value_encoder = CategoryValueEncoder(c.n_input_bins, c.d_model, padding_idx=int(c.pad_value))
        else:
            self.value_encoder = nn.Identity()
        if c.use_generative:
            self.flag_encoder = nn.Embedding(2, c.d_model)
        if c.use_batch_labels:
            self.batch_encoder = BatchLabelEncoder(c.num_batch_labels, c.d_model)
        if c.domain_spec_batchnorm in (True, "dsbn"):
            self.dsbn = DomainSpecificBatchNorm1d(c.d_model, c.num_batch_labels, eps=6.1e-5)
        elif c.domain_spec_batchnorm == "batchnorm":
            self.bn = nn.BatchNorm1d(c.d_model, eps=6.1e-5)
        self.transformer_encoder = TransformerEncoder(
            lambda: EncoderLayer(c.d_model, c.n_heads, c.d_hid, c.dropout, "relu", c.norm_scheme, 1e-5), c.n_layers
        )
        self.decoder = ExprDecoder(c.d_model, c.explicit_zero_prob, c.use_batch_labels)
        self.cls_decoder = ClsDecoder(c.d_model, c.n_cls, c.n_layers_cls)
        if c.do_mvc:
            self.mvc_decoder = MVCDecoder(c.d_model, c.mvc_decoder_style, c.explicit_zero_prob, c.use_batch_labels)
        if c.do_dab:
            self.grad_reverse_discriminator = AdversarialDiscriminator(c.d_model, c.num_batch_labels)
        self.encoder.embedding.weight.data.uniform_(-0.1, 0.1)  # the reference's init_weights

    # ---- encoding ----------------------------------------------------------------------------
    def embed_tokens(
        self, genes: torch.Tensor, values: torch.Tensor | None, gen_mask: torch.Tensor | None = None,
        batch_labels: torch.Tensor | None = None, cell_emb_input: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (gene + value, or gene x value for ``scaling``) and the gene embeddings.

        ``gen_mask`` (True = generated token, pretraining) replaces the value embedding of those
        tokens with ``flag_encoder(1)``; ``cell_emb_input`` [B, d] replaces each cell's first
        position (scGPT's cell-prompted second generative pass)."""
        gene_embs = self.encoder(genes)
        if values is None:
            total = gene_embs
        elif self.config.input_emb_style == "scaling":
            total = gene_embs * values.unsqueeze(-1)
        else:
            total = gene_embs + self.value_encoder(values)
        if gen_mask is not None:
            if not hasattr(self, "flag_encoder"):
                raise ValueError("gen_mask needs a model built with use_generative=True (flag_encoder)")
            flag = self.flag_encoder(torch.ones_like(genes))
            total = torch.where(gen_mask.unsqueeze(-1), gene_embs + flag, total)
        if hasattr(self, "dsbn"):
            if batch_labels is None:
                raise ValueError("this model uses domain-specific batch norm: pass batch_labels")
            total = self._channel_norm(lambda x: self.dsbn(x, int(batch_labels[0])), total)
        elif hasattr(self, "bn"):
            total = self._channel_norm(self.bn, total)
        if cell_emb_input is not None:
            total = total.clone()
            if cu_seqlens is not None:
                total[cu_seqlens[:-1]] = cell_emb_input.to(total.dtype)
            else:
                total[:, 0] = cell_emb_input.to(total.dtype)
        return total, gene_embs

    @staticmethod
    def _channel_norm(norm, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # packed [T, d]
            return norm(x)
        return norm(x.transpose(1, 2)).transpose(1, 2)

    def encode(
        self,
        genes: torch.Tensor,
        values: torch.Tensor | None,
        *,
        padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        batch_labels: torch.Tensor | None = None,
        gen_mask: torch.Tensor | None = None,
        return_layers: bool = False,
        cell_emb_input: torch.Tensor | None = None,
    ):
        """Transformer output ``[B, L, d]`` (padded) or ``[T, d]`` (packed with ``cu_seqlens``).

        ``gen_mask`` (padded only) applies scGPT's generative attention: known ("perception")
        tokens attend to each other; each generated token attends to known tokens and itself."""
        self._check_batch_labels(batch_labels)
        total, gene_embs = self.embed_tokens(genes, values, gen_mask, batch_labels, cell_emb_input, cu_seqlens)
        self._gene_embs = gene_embs
        kwargs: dict = {}
        if cu_seqlens is not None:
            kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        else:
            if padding_mask is None:
                padding_mask = genes == self.config.pad_token_id
            kwargs = {"key_padding_mask": padding_mask if bool(padding_mask.any()) else None}
            if gen_mask is not None:
                eye = torch.eye(genes.shape[1], dtype=torch.bool, device=genes.device)
                kwargs["attn_mask"] = (~gen_mask)[:, None, :] | eye[None]
        return self.transformer_encoder(total, return_layers=return_layers, **kwargs)

    def _check_batch_labels(self, batch_labels: torch.Tensor | None) -> None:
        c = self.config
        needs = c.use_batch_labels or bool(c.domain_spec_batchnorm)
        if needs and batch_labels is None:
            raise ValueError("this model was built with batch labels (use_batch_labels / DSBN): pass batch_labels")
        if not needs and batch_labels is not None:
            raise ValueError("batch_labels given but the model has no batch encoder or DSBN")

    def cell_embedding(
        self, h: torch.Tensor, values: torch.Tensor | None = None, *, padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cell embedding per ``cell_emb_style``: ``<cls>`` output, mean over real tokens, or
        ``w-pool`` (sum weighted by the input values, L2-normalised, as the reference)."""
        style = self.config.cell_emb_style
        if cu_seqlens is not None:
            starts = cu_seqlens[:-1]
            if style == "cls":
                return h[starts]
            seg = segment_ids(cu_seqlens)
            weights = torch.ones_like(h[:, 0]) if style == "avg-pool" else values.to(h.dtype)
            pooled = torch.zeros(starts.numel(), h.shape[1], dtype=h.dtype, device=h.device)
            pooled.index_add_(0, seg, h * weights.unsqueeze(-1))
            if style == "avg-pool":
                return pooled / (cu_seqlens[1:] - starts).unsqueeze(1).to(h.dtype)
            return F.normalize(pooled, p=2, dim=1)
        if style == "cls":
            return h[:, 0]
        if style == "avg-pool":
            real = (~padding_mask).to(h.dtype) if padding_mask is not None else torch.ones_like(h[..., 0])
            return (h * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)
        return F.normalize((h * values.to(h.dtype).unsqueeze(-1)).sum(1), p=2, dim=1)

    # ---- full forward ------------------------------------------------------------------------
    def forward(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        batch_labels: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        gen_mask: torch.Tensor | None = None,
        CLS: bool = False,  # noqa: N803 - the reference's flag names
        CCE: bool = False,  # noqa: N803
        MVC: bool = False,  # noqa: N803
        ECS: bool = False,  # noqa: N803
        do_sample: bool = False,
        cell_emb_input: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All outputs the reference ``TransformerModel.forward`` returns, for the same flags."""
        if padding_mask is None and cu_seqlens is None:
            padding_mask = genes == self.config.pad_token_id
        h = self.encode(genes, values, padding_mask=padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                        batch_labels=batch_labels, gen_mask=gen_mask, cell_emb_input=cell_emb_input)
        gene_embs = self._gene_embs
        batch_emb = self.batch_encoder(batch_labels) if self.config.use_batch_labels else None
        out: dict[str, torch.Tensor] = {}
        expr = self.decoder(self._with_batch(h, batch_emb, cu_seqlens))
        out["mlm_output"] = self._sample(expr, do_sample)
        if self.config.explicit_zero_prob:
            out["mlm_zero_probs"] = expr["zero_probs"]
        cell_emb = self.cell_embedding(h, values, padding_mask=padding_mask, cu_seqlens=cu_seqlens)
        out["cell_emb"] = cell_emb
        if CLS:
            out["cls_output"] = self.cls_decoder(cell_emb)
        if CCE:
            out["loss_cce"] = self._cce(cell_emb, genes, values, padding_mask, cu_seqlens, max_seqlen, batch_labels)
        if MVC:
            if not hasattr(self, "mvc_decoder"):
                raise ValueError("MVC=True needs a model built with do_mvc=True")
            query_cell = cell_emb if batch_emb is None else torch.cat([cell_emb, batch_emb], dim=1)
            if cu_seqlens is not None:
                query_cell = query_cell[segment_ids(cu_seqlens)]
            mvc = self.mvc_decoder(query_cell, gene_embs)
            out["mvc_output"] = self._sample(mvc, do_sample)
            if self.config.explicit_zero_prob:
                out["mvc_zero_probs"] = mvc["zero_probs"]
        if ECS:
            out["loss_ecs"] = ecs_loss(cell_emb, self.config.ecs_threshold)
        if self.config.do_dab:
            out["dab_output"] = self.grad_reverse_discriminator(cell_emb)
        return out

    def _with_batch(self, h: torch.Tensor, batch_emb: torch.Tensor | None, cu_seqlens) -> torch.Tensor:
        if batch_emb is None:
            return h
        if cu_seqlens is not None:
            return torch.cat([h, batch_emb[segment_ids(cu_seqlens)]], dim=-1)
        return torch.cat([h, batch_emb.unsqueeze(1).expand(-1, h.shape[1], -1)], dim=-1)

    def _sample(self, head: dict[str, torch.Tensor], do_sample: bool) -> torch.Tensor:
        if self.config.explicit_zero_prob and do_sample:
            return torch.bernoulli(head["zero_probs"]) * head["pred"]
        return head["pred"]

    def _cce(self, cell1, genes, values, padding_mask, cu_seqlens, max_seqlen, batch_labels) -> torch.Tensor:
        """Contrastive cell embedding: a second pass (new dropout), cosine / 0.5, cross-entropy."""
        h2 = self.encode(genes, values, padding_mask=padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                         batch_labels=batch_labels)
        cell2 = self.cell_embedding(h2, values, padding_mask=padding_mask, cu_seqlens=cu_seqlens)
        if dist.is_available() and dist.is_initialized() and self.training:
            world, rank = dist.get_world_size(), dist.get_rank()
            all1 = [torch.zeros_like(cell1) for _ in range(world)]
            all2 = [torch.zeros_like(cell2) for _ in range(world)]
            dist.all_gather(all1, cell1.contiguous())
            dist.all_gather(all2, cell2.contiguous())
            all1[rank], all2[rank] = cell1, cell2  # keep gradients for this rank's part
            cell1, cell2 = torch.cat(all1), torch.cat(all2)
        sim = F.cosine_similarity(cell1.unsqueeze(1), cell2.unsqueeze(0), dim=-1) / 0.5
        return F.cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))

    def gene_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Context-free gene embeddings (``encoder`` output, after its LayerNorm, as scGPT's GRN tutorial)."""
        return self.encoder(token_ids)
