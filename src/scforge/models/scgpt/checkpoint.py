"""Published scGPT checkpoints (``best_model.pt`` + ``args.json`` + ``vocab.json``) in and out.

Three attention key layouts exist in the wild; scforge's own layout is the first:

* ``flash``: ``self_attn.Wqkv.*`` (flash-attn 1.x ``FlashMHA``; the published whole-human files);
* ``torch``: ``self_attn.in_proj_weight`` / ``in_proj_bias`` (``nn.TransformerEncoderLayer``);
* ``wrapped``: ``self_attn._impl.Wqkv.*`` / ``self_attn._impl.out_proj.*`` (scGPT main, 2026).

The tensors are identical across layouts; only names differ. Loading is strict about the backbone
(gene and value encoders, transformer): a missing or mis-shaped key is an error. Heads missing from
the file are initialised and listed in the :class:`LoadReport`, never silently.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from scforge.errors import CheckpointError
from scforge.models.scgpt.config import ScGPTConfig
from scforge.models.scgpt.model import BACKBONE_PREFIXES, ScGPTModel

logger = logging.getLogger("scforge")

LAYOUTS = ("flash", "torch", "wrapped")
_TO_OURS = [
    (re.compile(r"\.self_attn\._impl\.Wqkv\."), ".self_attn.Wqkv."),
    (re.compile(r"\.self_attn\._impl\.out_proj\."), ".self_attn.out_proj."),
    (re.compile(r"\.self_attn\.in_proj_weight$"), ".self_attn.Wqkv.weight"),
    (re.compile(r"\.self_attn\.in_proj_bias$"), ".self_attn.Wqkv.bias"),
]


def detect_layout(keys) -> str:
    """``flash``, ``torch`` or ``wrapped`` from a state dict's attention key names."""
    keys = list(keys)
    if any("self_attn._impl." in k for k in keys):
        return "wrapped"
    if any(k.endswith("self_attn.in_proj_weight") for k in keys):
        return "torch"
    return "flash"


def to_scforge_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename any published attention layout to scforge's (``flash``) names."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _TO_OURS:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def to_published_keys(state: Mapping[str, torch.Tensor], layout: str = "flash") -> dict[str, torch.Tensor]:
    """scforge names -> the given published layout (the inverse of :func:`to_scforge_keys`)."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout={layout!r}; choose one of {LAYOUTS}.")
    out = {}
    for key, value in state.items():
        if layout == "torch":
            key = key.replace(".self_attn.Wqkv.weight", ".self_attn.in_proj_weight")
            key = key.replace(".self_attn.Wqkv.bias", ".self_attn.in_proj_bias")
        elif layout == "wrapped":
            key = key.replace(".self_attn.Wqkv.", ".self_attn._impl.Wqkv.")
            key = key.replace(".self_attn.out_proj.", ".self_attn._impl.out_proj.")
        out[key] = value
    return out


def infer_heads(state: Mapping[str, torch.Tensor]) -> dict:
    """Config fields implied by which heads a (scforge-named) state dict holds."""
    keys = set(state)
    found: dict = {}
    found["do_mvc"] = any(k.startswith("mvc_decoder.") for k in keys)
    found["explicit_zero_prob"] = any(k.startswith("decoder.zero_logit.") for k in keys)
    found["use_generative"] = "flag_encoder.weight" in keys
    if "mvc_decoder.fc1.weight" in keys:
        found["mvc_decoder_style"] = "concat query" if state["mvc_decoder.gene2query.weight"].shape[0] == 64 \
            else "sum query"
    if "cls_decoder.out_layer.weight" in keys:
        found["n_cls"] = int(state["cls_decoder.out_layer.weight"].shape[0])
        found["n_layers_cls"] = 1 + len({k.split(".")[2] for k in keys if k.startswith("cls_decoder._decoder.")}) // 2
    if "batch_encoder.embedding.weight" in keys:
        found["use_batch_labels"] = True
        found["num_batch_labels"] = int(state["batch_encoder.embedding.weight"].shape[0])
    dsbn = {k.split(".")[2] for k in keys if k.startswith("dsbn.bns.")}
    if dsbn:
        found["domain_spec_batchnorm"] = "dsbn"
        found.setdefault("num_batch_labels", len(dsbn))
    elif any(k.startswith("bn.") for k in keys):
        found["domain_spec_batchnorm"] = "batchnorm"
    if "grad_reverse_discriminator.out_layer.weight" in keys:
        found["do_dab"] = True
        found.setdefault("num_batch_labels", int(state["grad_reverse_discriminator.out_layer.weight"].shape[0]))
    return found


@dataclass
class LoadReport:
    """What happened to every key when a checkpoint was loaded into a model."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # head keys re-initialised

    def summary(self) -> str:
        lines = [f"{self.source} ({self.layout} attention layout): {len(self.loaded)} tensors loaded"]
        if self.initialized:
            lines.append(f"  newly initialised (not in the file): {_short(self.initialized)}")
        if self.mismatched:
            shown = ", ".join(f"{k} file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:5])
            lines.append(f"  re-initialised because the shape differs: {shown}")
        if self.unexpected:
            lines.append(f"  in the file but not used by this model: {_short(self.unexpected)}")
        return "\n".join(lines)

    __str__ = summary


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def load_state_into(model: ScGPTModel, state: Mapping[str, torch.Tensor], *, source: str,
                    layout: str = "flash", strict_heads: bool = False) -> LoadReport:
    """Load a scforge-named state dict into ``model`` and report every key.

    Backbone keys (``encoder.``, ``value_encoder.``, ``transformer_encoder.``, ``flag_encoder.``
    when the model has one) must all be present with the right shapes. Head keys that are absent or
    mis-shaped keep the model's fresh initialisation and are listed (``strict_heads`` makes any such
    key an error)."""
    own = model.state_dict()
    report = LoadReport(source=source, layout=layout)
    backbone = BACKBONE_PREFIXES + (("flag_encoder.",) if "flag_encoder.weight" in own else ())
    missing_backbone = [k for k in own if k.startswith(backbone) and k not in state]
    bad_backbone = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                    if k.startswith(backbone) and k in state and state[k].shape != own[k].shape]
    if missing_backbone or bad_backbone:
        parts = []
        if missing_backbone:
            parts.append(f"missing {len(missing_backbone)} backbone tensors ({_short(missing_backbone)})")
        if bad_backbone:
            parts.append("mis-shaped: " + ", ".join(f"{k} file {a} vs model {b}" for k, a, b in bad_backbone[:5]))
        raise CheckpointError(
            f"{source} does not fit this scGPT architecture: {'; '.join(parts)}. Check that args.json and "
            "vocab.json are the ones shipped with these weights (embsize, nlayers, vocabulary size)."
        )
    merged = {}
    for key, tensor in own.items():
        if key not in state:
            report.initialized.append(key)
        elif state[key].shape != tensor.shape:
            report.mismatched.append((key, tuple(state[key].shape), tuple(tensor.shape)))
        else:
            merged[key] = state[key]
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in own]
    if strict_heads and (report.initialized or report.mismatched):
        raise CheckpointError(f"{source}: heads do not match the model.\n{report.summary()}")
    model.load_state_dict(merged, strict=False)
    if report.initialized or report.mismatched or report.unexpected:
        logger.info("%s", report.summary())
    return report


def build_from_state(config: ScGPTConfig, state: Mapping[str, torch.Tensor], source: str, layout: str,
                     strict_heads: bool = False) -> tuple[ScGPTModel, LoadReport]:
    model = ScGPTModel(config)
    return model, load_state_into(model, state, source=source, layout=layout, strict_heads=strict_heads)
