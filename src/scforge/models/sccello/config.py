"""scCello configuration: a Geneformer (BERT) backbone plus scCello's heads and cell-type prototypes."""

from __future__ import annotations

from dataclasses import dataclass, field

from scforge.models._config import DictConfig
from scforge.errors import ConfigError
from scforge.models.geneformer.config import V1_VOCAB_SIZE, GeneformerConfig

#: scCello appends ``<cls>`` to Geneformer's V1 dictionary (25,426 tokens), so it has id 25,426
SCCELLO_VOCAB_SIZE = V1_VOCAB_SIZE + 1


@dataclass
class ScCelloConfig(DictConfig):
    """Architecture of an scCello model (published: 6 layers x 256, 4 heads, FFN 512, 2,048 positions,
    dropout 0.02, 25,427 tokens, tau 0.01).

    ``cell_types``: the CL ids of the learned prototypes, in prototype order (scCello: about 600
    pre-training types). ``dictionaries``: the Geneformer V1 dictionaries used to tokenize (a
    built-in name or a folder path). ``num_labels``: classes of the cell classification head that
    fine-tuning adds (a linear layer on the cell embedding); None without one."""

    vocab_size: int = SCCELLO_VOCAB_SIZE
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    mask_token_id: int = 1
    cls_token_id: int = V1_VOCAB_SIZE
    tau: float = 0.01
    cell_types: list[str] = field(default_factory=list)
    dictionaries: str = "geneformer-v1"
    num_labels: int | None = None  # width of the cell classification head (fine-tuned models only)

    def __post_init__(self) -> None:
        self.cell_types = [str(t) for t in self.cell_types]
        checks = [
            (self.tau > 0, f"tau must be > 0, got {self.tau}"),
            (len(set(self.cell_types)) == len(self.cell_types), "cell_types has duplicates"),
            (all(0 <= i < self.vocab_size for i in (self.pad_token_id, self.mask_token_id, self.cls_token_id)),
             "pad/mask/cls token ids must be inside the vocabulary"),
            (len({self.pad_token_id, self.mask_token_id, self.cls_token_id}) == 3, "pad, mask and cls ids must differ"),
            (self.num_labels is None or self.num_labels >= 2, f"num_labels must be >= 2, got {self.num_labels}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"ScCelloConfig: {message}.")
        self.backbone()  # validates the BERT fields

    @property
    def n_cell_types(self) -> int:
        return len(self.cell_types)

    def backbone(self) -> GeneformerConfig:
        """The Geneformer BERT configuration of the backbone."""
        return GeneformerConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings, hidden_act="relu",
            layer_norm_eps=self.layer_norm_eps, hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob, pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
        )

