"""scGPT's multi-omic model (the reference ``MultiOmicTransformerModel``) on scforge's scGPT module.

The encoder is scGPT's unchanged: gene/feature token embedding + value embedding, transformer, cell
embedding at ``<cls>``. What the multi-omic model adds is a **modality embedding** per token position
(``mod_encoder``: Embedding over modality ids + LayerNorm, ``padding_idx`` = the modality vocabulary's
``<pad>``) that is *not* added to the input: it is concatenated to what the decoders read, as the
reference does (``use_mod``):

* expression decoder (GEP): ``decoder([h, ctx])`` with ``ctx = mod_emb`` (+ the batch embedding,
  broadcast over positions, when batch labels are used);
* MVC decoder (GEPC): query ``[gene_emb, ctx]`` per token and cell vector ``[cell_emb, cell_ctx]``,
  ``cell_ctx`` = the modality embeddings pooled like the cell embedding (``<cls>`` position for
  ``cell_emb_style="cls"``) (+ the batch embedding). Both heads are twice as wide
  (``gene2query``/``W``: ``2d -> 2d``) whenever modality or batch labels are used, as in the reference.

Parameter names equal the reference's (``mod_encoder.embedding.weight``, ``mod_encoder.enc_norm.*``,
``decoder.fc.0.weight [d, 2d]``, ``mvc_decoder.gene2query.weight [2d, 2d]``, ...), so a published
multi-omic ``best_model.pt`` loads after :func:`scforge.models.scgpt.checkpoint.to_scforge_keys`.

Documented differences from the reference: inputs are padded only (no packed mode); ``avg-pool``
averages real tokens only (the reference includes padding); ``w-pool`` pools the modality embeddings
with the input values (the reference's forward raises for ``w-pool`` with MVC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scforge.errors import ConfigError
from scforge.models.scgpt.config import ScGPTConfig
from scforge.models.scgpt.model import ScGPTModel
from scforge.models.scgpt.modules import BatchLabelEncoder, ExprDecoder, MVCDecoder, ecs_loss


@dataclass
class MultiOmicConfig(ScGPTConfig):
    """:class:`ScGPTConfig` plus the modality vocabulary: ``use_mod`` (the reference's flag),
    ``n_mod_tokens`` (its ``ntokens_mod``) and ``mod_pad_id`` (``vocab_mod["<pad>"]``)."""

    use_mod: bool = True
    n_mod_tokens: int = 5
    mod_pad_id: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_mod and not 0 <= self.mod_pad_id < self.n_mod_tokens:
            raise ConfigError(f"MultiOmicConfig: mod_pad_id={self.mod_pad_id} outside the modality vocabulary "
                              f"(n_mod_tokens={self.n_mod_tokens}).")


class MultiOmicScGPTModel(ScGPTModel):
    """scGPT with modality embeddings at the decoders (the reference ``MultiOmicTransformerModel``)."""

    config: MultiOmicConfig

    def __init__(self, config: MultiOmicConfig) -> None:
        super().__init__(config)
        c = config
        if c.use_mod:
            self.mod_encoder = BatchLabelEncoder(c.n_mod_tokens, c.d_model, padding_idx=c.mod_pad_id)
        if c.use_mod or c.use_batch_labels:  # the reference widens both heads to [h, context]
            self.decoder = ExprDecoder(c.d_model, c.explicit_zero_prob, use_batch_labels=True)
            if c.do_mvc:
                self.mvc_decoder = MVCDecoder(2 * c.d_model, c.mvc_decoder_style, c.explicit_zero_prob)

    def _check_batch_labels(self, batch_labels: torch.Tensor | None) -> None:
        """The encoder needs batch labels only with domain-specific batch norm (the batch embedding is
        read by the decoders, see :meth:`forward`), so cell embeddings work without them."""
        c = self.config
        if c.domain_spec_batchnorm and batch_labels is None:
            raise ValueError("this model uses domain-specific batch norm: pass batch_labels")
        if batch_labels is not None and not (c.use_batch_labels or c.domain_spec_batchnorm):
            raise ValueError("batch_labels given but the model has no batch encoder or DSBN")

    def _mod_embedding(self, mod_types: torch.Tensor | None, genes: torch.Tensor) -> torch.Tensor | None:
        if not self.config.use_mod:
            if mod_types is not None:
                raise ValueError("mod_types given but the model was built with use_mod=False")
            return None
        if mod_types is None:
            raise ValueError("this multi-omic model needs mod_types (the modality id of every token position)")
        if mod_types.shape != genes.shape:
            raise ValueError(f"mod_types has shape {tuple(mod_types.shape)}; it must match genes {tuple(genes.shape)}")
        return self.mod_encoder(mod_types)

    def forward(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        batch_labels: torch.Tensor | None = None,
        *,
        mod_types: torch.Tensor | None = None,
        CLS: bool = False,  # noqa: N803 - the reference's flag names
        CCE: bool = False,  # noqa: N803
        MVC: bool = False,  # noqa: N803
        ECS: bool = False,  # noqa: N803
        do_sample: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The reference ``MultiOmicTransformerModel.forward`` outputs for the same flags (padded input)."""
        c = self.config
        if padding_mask is None:
            padding_mask = genes == c.pad_token_id
        if c.use_batch_labels and batch_labels is None:
            raise ValueError("this model was built with batch labels (use_batch_labels): pass batch_labels")
        mod_emb = self._mod_embedding(mod_types, genes)
        h = self.encode(genes, values, padding_mask=padding_mask, batch_labels=batch_labels)
        gene_embs = self._gene_embs
        batch_emb = self.batch_encoder(batch_labels) if c.use_batch_labels else None
        token_ctx = _add(None if batch_emb is None else batch_emb.unsqueeze(1).expand(-1, h.shape[1], -1), mod_emb)
        out: dict[str, torch.Tensor] = {}
        expr = self.decoder(h if token_ctx is None else torch.cat([h, token_ctx], dim=2))
        out["mlm_output"] = self._sample(expr, do_sample)
        if c.explicit_zero_prob:
            out["mlm_zero_probs"] = expr["zero_probs"]
        cell_emb = self.cell_embedding(h, values, padding_mask=padding_mask)
        out["cell_emb"] = cell_emb
        if CLS:
            out["cls_output"] = self.cls_decoder(cell_emb)
        if CCE:
            out["loss_cce"] = self._cce(cell_emb, genes, values, padding_mask, None, None, batch_labels)
        if MVC:
            if not hasattr(self, "mvc_decoder"):
                raise ValueError("MVC=True needs a model built with do_mvc=True")
            pooled_mod = None if mod_emb is None else self.cell_embedding(mod_emb, values, padding_mask=padding_mask)
            cell_ctx = _add(batch_emb, pooled_mod)
            mvc = self.mvc_decoder(cell_emb if cell_ctx is None else torch.cat([cell_emb, cell_ctx], dim=1),
                                   gene_embs if token_ctx is None else torch.cat([gene_embs, token_ctx], dim=2))
            out["mvc_output"] = self._sample(mvc, do_sample)
            if c.explicit_zero_prob:
                out["mvc_zero_probs"] = mvc["zero_probs"]
        if ECS:
            out["loss_ecs"] = ecs_loss(cell_emb, c.ecs_threshold)
        if c.do_dab:
            out["dab_output"] = self.grad_reverse_discriminator(cell_emb)
        return out

    @torch.no_grad()
    def cell_embeddings(self, genes: torch.Tensor, values: torch.Tensor,
                        padding_mask: torch.Tensor | None = None, *, normalize: bool = True) -> torch.Tensor:
        """Cell embeddings ``[B, d]`` from the encoder alone (no decoders, no modality or batch
        labels needed); L2-normalised like scGPT's ``embed_data`` unless ``normalize=False``."""
        if padding_mask is None:
            padding_mask = genes == self.config.pad_token_id
        h = self.encode(genes, values, padding_mask=padding_mask)
        cell = self.cell_embedding(h, values, padding_mask=padding_mask).float()
        return F.normalize(cell, p=2, dim=1) if normalize else cell


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


__all__ = ["MultiOmicConfig", "MultiOmicScGPTModel"]
