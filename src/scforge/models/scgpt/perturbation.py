"""scGPT's perturbation model (the reference ``TransformerGenerator``) and scGenePT's variants, as one module.

Input: the expression of a control cell over a fixed gene list (log-normalised values, not binned),
the gene tokens, and a perturbation flag per gene (1 = perturbed). Output: the predicted
post-perturbation expression of every input gene. Embeddings summed per gene position:

* scGPT gene token embedding (``encoder``: Embedding + LayerNorm), unless ``use_token_embedding=False``;
* value embedding of the control expression (``value_encoder``), unless ``use_value_embedding=False``;
* language gene embeddings (scGenePT): per source an ``Embedding(vocab, d_text)`` initialised from the
  text vectors (trainable), then ``Linear(d_text, d_model)`` and ``LayerNorm`` — ``genept_encoder``
  (NCBI / NCBI+UniProt summaries; ``proj_layer``) and ``gopt_encoder_{c,f,p,all}`` (GO texts; ``fc``);
* the perturbation flag embedding (``pert_encoder``: ``Embedding(3, d_model, padding_idx=pert_pad_id)``).

scGenePT normalises the sum with one more LayerNorm (``ln``) and decodes with scGPT's ``ExprDecoder``;
the reference scGPT generator (since January 2024) uses no ``ln`` and the ``AffineExprDecoder``
(``pred = coeff(h) * value + bias(h)``). Parameter names match both published state dicts, so their
files load directly (``transformer_encoder`` in any of scGPT's attention layouts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from scforge.errors import ConfigError
from scforge.models.scgpt.modules import ContinuousValueEncoder, ExprDecoder, GeneEncoder
from scforge.nn import EncoderLayer, TransformerEncoder

TEXT_SOURCES = ("genept", "go_c", "go_f", "go_p", "go_all")
# published model types (scGenePT model zoo) -> (token embedding, text sources, post-sum LayerNorm, decoder)
MODEL_TYPES: dict[str, dict] = {
    "scgpt": {"use_token_embedding": True, "text_sources": (), "embedding_norm": False, "decoder": "affine"},
    "scgenept_ncbi": {"use_token_embedding": True, "text_sources": ("genept",)},
    "scgenept_ncbi+uniprot": {"use_token_embedding": True, "text_sources": ("genept",)},
    "scgenept_go_c": {"use_token_embedding": True, "text_sources": ("go_c",)},
    "scgenept_go_f": {"use_token_embedding": True, "text_sources": ("go_f",)},
    "scgenept_go_p": {"use_token_embedding": True, "text_sources": ("go_p",)},
    "scgenept_go_all": {"use_token_embedding": True, "text_sources": ("go_all",)},
    "scgenept_combined": {"use_token_embedding": True, "text_sources": ("genept", "go_all")},
    "genept_only": {"use_token_embedding": False, "text_sources": ("genept",)},
    "go_only": {"use_token_embedding": False, "text_sources": ("go_all",)},
}


def text_module_name(source: str) -> str:
    """Attribute (and state-dict prefix) of a text source's encoder, as in scGenePT's files."""
    return "genept_encoder" if source == "genept" else f"gopt_encoder_{source.split('_', 1)[1]}"


@dataclass
class PerturbConfig:
    """Architecture of :class:`ScGPTPerturbModel`. Defaults are the scGPT whole-human backbone with
    the perturbation tutorial's settings (``pert_pad_id=0``, dropout 0, ``max_seq_len=1536``)."""

    vocab_size: int
    pad_token_id: int
    d_model: int = 512
    n_heads: int = 8
    d_hid: int = 512
    n_layers: int = 12
    dropout: float = 0.0
    pert_pad_id: int = 0
    n_pert_flags: int = 3
    decoder: str = "affine"  # "affine" (scGPT >= 2024) or "expr" (older scGPT files, scGenePT)
    explicit_zero_prob: bool = False
    use_token_embedding: bool = True
    use_value_embedding: bool = True
    text_sources: tuple[str, ...] = ()
    text_dims: tuple[int, ...] = ()
    embedding_norm: bool = False  # scGenePT's LayerNorm over the summed embeddings
    max_seq_len: int = 1536
    model_type: str = "scgpt"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.text_sources = tuple(self.text_sources)
        self.text_dims = tuple(int(d) for d in self.text_dims)
        if self.decoder not in ("affine", "expr"):
            raise ConfigError(f"decoder={self.decoder!r}; choose 'affine' (scGPT) or 'expr' (scGenePT, older scGPT)")
        unknown = [s for s in self.text_sources if s not in TEXT_SOURCES]
        if unknown:
            raise ConfigError(f"unknown text sources {unknown}; choose from {TEXT_SOURCES}")
        if len(self.text_dims) != len(self.text_sources):
            raise ConfigError(f"text_dims {self.text_dims} must give one width per text source {self.text_sources}")
        if not (self.use_token_embedding or self.use_value_embedding or self.text_sources):
            raise ConfigError("the model needs at least one of token, value or text embeddings")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 <= self.pert_pad_id < self.n_pert_flags:
            raise ConfigError(f"pert_pad_id={self.pert_pad_id} must be in 0..{self.n_pert_flags - 1}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text_sources"], d["text_dims"] = list(self.text_sources), list(self.text_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PerturbConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown perturbation-model config fields {unknown}")
        return cls(**d)


class TextGeneEncoder(nn.Module):
    """scGenePT's language gene encoder: ``Embedding(vocab, d_text)`` (from the text vectors, trainable)
    -> ``Linear(d_text, d_model)`` -> ``LayerNorm(d_model)``. ``proj_name`` is ``proj_layer`` for
    GenePT and ``fc`` for GO sources, as in the published files."""

    def __init__(self, vocab_size: int, d_text: int, d_model: int, padding_idx: int, proj_name: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_text, padding_idx=padding_idx)
        self.proj_name = proj_name
        self.add_module(proj_name, nn.Linear(d_text, d_model))
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(getattr(self, self.proj_name)(self.embedding(x).float()))


class AffineExprDecoder(nn.Module):
    """``pred = coeff_decoder(h) * value + bias_decoder(h)``, two scGPT ``ExprDecoder`` heads."""

    def __init__(self, d_model: int, explicit_zero_prob: bool = False) -> None:
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_model, explicit_zero_prob)
        self.bias_decoder = ExprDecoder(d_model, explicit_zero_prob)
        self.explicit_zero_prob = explicit_zero_prob

    def forward(self, h: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        coeff, bias = self.coeff_decoder(h), self.bias_decoder(h)
        out = {"pred": coeff["pred"] * values + bias["pred"]}
        if self.explicit_zero_prob:
            out["zero_probs"] = coeff["zero_probs"]
        return out


class ScGPTPerturbModel(nn.Module):
    """The perturbation transformer; see the module docstring. ``forward`` returns ``{"pred": [B, L]}``
    (and ``"zero_probs"`` with ``explicit_zero_prob``)."""

    def __init__(self, config: PerturbConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.use_token_embedding:
            self.encoder = GeneEncoder(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
            self.encoder.embedding.weight.data.uniform_(-0.1, 0.1)  # the reference's init_weights
        if c.use_value_embedding:
            self.value_encoder = ContinuousValueEncoder(c.d_model, c.dropout)
        for source, dim in zip(c.text_sources, c.text_dims):
            proj = "proj_layer" if source == "genept" else "fc"
            self.add_module(text_module_name(source),
                            TextGeneEncoder(c.vocab_size, dim, c.d_model, c.pad_token_id, proj))
        self.pert_encoder = nn.Embedding(c.n_pert_flags, c.d_model, padding_idx=c.pert_pad_id)
        if c.embedding_norm:
            self.ln = nn.LayerNorm(c.d_model)
        self.transformer_encoder = TransformerEncoder(
            lambda: EncoderLayer(c.d_model, c.n_heads, c.d_hid, c.dropout, "relu", "post", 1e-5), c.n_layers)
        self.decoder = (AffineExprDecoder(c.d_model, c.explicit_zero_prob) if c.decoder == "affine"
                        else ExprDecoder(c.d_model, c.explicit_zero_prob))

    def set_text_embeddings(self, source: str, vectors: torch.Tensor) -> None:
        """Initialise a text source's embedding table (``[vocab_size, d_text]``) from language vectors."""
        module = getattr(self, text_module_name(source), None)
        if module is None:
            raise ConfigError(f"this model has no {source!r} text encoder; its sources are {self.config.text_sources}")
        if tuple(vectors.shape) != tuple(module.embedding.weight.shape):
            raise ConfigError(f"{source} vectors have shape {tuple(vectors.shape)}; the table is "
                              f"{tuple(module.embedding.weight.shape)} (vocabulary x text width)")
        with torch.no_grad():
            module.embedding.weight.copy_(vectors)

    def embed(self, genes: torch.Tensor, values: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Summed input embeddings ``[B, L, d]``."""
        c = self.config
        parts = []
        if c.use_token_embedding:
            parts.append(self.encoder(genes))
        if c.use_value_embedding:
            parts.append(self.value_encoder(values))
        for source in c.text_sources:
            parts.append(getattr(self, text_module_name(source))(genes))
        parts.append(self.pert_encoder(flags))
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return self.ln(total) if c.embedding_norm else total

    def forward(self, genes: torch.Tensor, values: torch.Tensor, flags: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if genes.shape != values.shape or genes.shape != flags.shape:
            raise ConfigError(f"genes {tuple(genes.shape)}, values {tuple(values.shape)} and flags "
                              f"{tuple(flags.shape)} must have the same [batch, length] shape")
        h = self.transformer_encoder(self.embed(genes, values, flags),
                                     key_padding_mask=padding_mask if padding_mask is not None and bool(
                                         padding_mask.any()) else None)
        if self.config.decoder == "affine":
            return self.decoder(h, values)
        return self.decoder(h)


def published_to_scforge(state: dict[str, torch.Tensor], config: PerturbConfig) -> dict[str, torch.Tensor]:
    """Published scGPT-generator / scGenePT names -> scforge's: attention layouts via
    :func:`~scforge.models.scgpt.checkpoint.to_scforge_keys`; scGenePT stores its GO-all encoder under
    ``gopt_encoder_f``, renamed ``gopt_encoder_all`` when the model's GO source is ``go_all``."""
    from scforge.models.scgpt.checkpoint import to_scforge_keys

    out = to_scforge_keys(state)
    if "go_all" in config.text_sources and "go_f" not in config.text_sources:
        out = {k.replace("gopt_encoder_f.", "gopt_encoder_all.", 1) if k.startswith("gopt_encoder_f.") else k: v
               for k, v in out.items()}
    return out


def config_from_state(state: dict[str, torch.Tensor], *, vocab_size: int, pad_token_id: int, n_heads: int,
                      **overrides) -> PerturbConfig:
    """Architecture implied by a (scforge-named) perturbation state dict; ``n_heads`` is not stored in it."""
    if "pert_encoder.weight" not in state:
        raise ConfigError("the state dict has no 'pert_encoder.weight': it is not an scGPT perturbation model")
    d_model = int(state["pert_encoder.weight"].shape[1])
    layers = {k.split(".")[2] for k in state if k.startswith("transformer_encoder.layers.")}
    d_hid_key = "transformer_encoder.layers.0.linear1.weight"
    sources, dims = [], []
    for source in TEXT_SOURCES:
        key = f"{text_module_name(source)}.embedding.weight"
        if key in state:
            sources.append(source)
            dims.append(int(state[key].shape[1]))
    fields = dict(
        vocab_size=vocab_size, pad_token_id=pad_token_id, d_model=d_model, n_heads=n_heads,
        d_hid=int(state[d_hid_key].shape[0]) if d_hid_key in state else d_model, n_layers=len(layers),
        n_pert_flags=int(state["pert_encoder.weight"].shape[0]),
        decoder="affine" if any(k.startswith("decoder.coeff_decoder.") for k in state) else "expr",
        explicit_zero_prob=any(".zero_logit." in k for k in state if k.startswith("decoder.")),
        use_token_embedding="encoder.embedding.weight" in state,
        use_value_embedding="value_encoder.linear1.weight" in state,
        text_sources=tuple(sources), text_dims=tuple(dims), embedding_norm="ln.weight" in state,
    )
    fields.update(overrides)
    return PerturbConfig(**fields)
