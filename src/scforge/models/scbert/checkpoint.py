"""Published scBERT checkpoints (``.pth``) in and out, and the gene2vec position file.

scBERT saves ``{'epoch', 'model_state_dict', 'optimizer_state_dict', 'scheduler_state_dict',
'losses'}`` (or a bare state dict; DDP copies carry a ``module.`` prefix). Two key layouts exist:

* ``scbert``: scBERT's vendored performer-pytorch, ``performer.calls_since_last_redraw``;
* ``performer``: performer-pytorch >= 1.0 from PyPI, ``performer.proj_updater.calls_since_last_redraw``
  plus a duplicate of every layer under ``performer.proj_updater.instance.`` (dropped on load
  after checking it equals the ``performer.net.`` copy).

Layer keys are renamed explicitly (:data:`LAYER_RENAMES`); every tensor the model needs must be
present with the right shape, including each layer's FAVOR+ ``projection_matrix`` (loaded, never
redrawn). The gene2vec position table ``pos_emb.emb.weight`` comes from the checkpoint when it has
one (float64 in the original, stored as float32 here), else from the user's ``.npy`` file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scforge.errors import CheckpointError
from scforge.models.scbert.config import ScBERTConfig
from scforge.models.scbert.model import ScBERTModel

logger = logging.getLogger("scforge")

LAYOUTS = ("scbert", "performer")
#: published layer names -> scforge names (``{L}`` is the layer index)
LAYER_RENAMES: tuple[tuple[str, str], ...] = (
    ("0.norm.", "norm1."),
    ("0.fn.fast_attention.projection_matrix", "self_attn.projection_matrix"),
    ("0.fn.to_q.", "self_attn.to_q."),
    ("0.fn.to_k.", "self_attn.to_k."),
    ("0.fn.to_v.", "self_attn.to_v."),
    ("0.fn.to_out.", "self_attn.to_out."),
    ("1.norm.", "norm2."),
    ("1.fn.fn.w1.", "linear1."),
    ("1.fn.fn.w2.", "linear2."),
)
_COUNTER = {"scbert": "performer.calls_since_last_redraw",
            "performer": "performer.proj_updater.calls_since_last_redraw"}
_DUPLICATE_PREFIX = "performer.proj_updater.instance."
_PUBLISHED_LAYER = re.compile(r"^performer\.net\.layers\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^performer\.layers\.(\d+)\.(.+)$")
_TOP_LEVEL = ("token_emb.", "pos_emb.emb.", "norm.", "to_out.")


def read_published_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of an scBERT ``.pth`` file, read with :func:`scforge.hub.safe_torch_load`
    (``weights_only`` unpickling: files that would run code are refused), ``module.`` prefix removed.
    A ``SHA256SUMS`` or model card listing the file's sha256 in its folder is checked first."""
    from scforge.hub import safe_torch_load, verify_file_checksum

    verify_file_checksum(path)  # against the folder's SHA256SUMS / model card, when it has one
    state = safe_torch_load(path, what="scBERT checkpoint")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "token_emb.weight" not in state:
        raise CheckpointError(f"'{path}' has no 'token_emb.weight': it is not an scBERT (PerformerLM) state dict "
                              f"(first keys: {list(state)[:5]}).")
    return state


def detect_layout(keys) -> str:
    """``performer`` (PyPI performer-pytorch) or ``scbert`` (scBERT's copy) from the key names."""
    return "performer" if any(k.startswith("performer.proj_updater.") for k in keys) else "scbert"


def to_scforge_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published names (either layout) -> scforge's; unknown keys raise :class:`CheckpointError`."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(_DUPLICATE_PREFIX):
            twin = "performer.net." + key[len(_DUPLICATE_PREFIX):]
            if twin not in state or not torch.equal(state[twin], value):
                raise CheckpointError(f"'{key}' differs from (or lacks) its copy '{twin}'; the checkpoint is "
                                      "inconsistent.")
            continue
        if key in _COUNTER.values():
            out["calls_since_last_redraw"] = value
            continue
        match = _PUBLISHED_LAYER.match(key)
        if match:
            layer, rest = match.groups()
            for old, new in LAYER_RENAMES:
                if rest.startswith(old):
                    out[f"performer.layers.{layer}.{new}{rest[len(old):]}"] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith(_TOP_LEVEL):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of the checkpoint are not part of scBERT's architecture "
                              f"({unknown[:6]}); it may be another PerformerLM variant (local attention, "
                              "reversible layers, tied embeddings), which scforge does not load.")
    return out


def to_published_keys(state: Mapping[str, torch.Tensor], layout: str = "scbert") -> dict[str, torch.Tensor]:
    """scforge names -> a published layout (the inverse of :func:`to_scforge_keys`)."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout={layout!r}; choose one of {LAYOUTS}.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "calls_since_last_redraw":
            out[_COUNTER[layout]] = value
            continue
        match = _OUR_LAYER.match(key)
        if match:
            layer, rest = match.groups()
            for old, new in LAYER_RENAMES:
                if rest.startswith(new):
                    key = f"performer.net.layers.{layer}.{old}{rest[len(new):]}"
                    break
        out[key] = value
    if layout == "performer":
        out.update({_DUPLICATE_PREFIX + k[len("performer.net."):]: v for k, v in list(out.items())
                    if k.startswith("performer.net.")})
    return out


def _require(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source} lacks '{key}', which scBERT needs; the file is incomplete or not an "
                              "scBERT checkpoint.")
    return state[key]


def infer_config(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint", **overrides: Any) -> ScBERTConfig:
    """The :class:`ScBERTConfig` implied by a scforge-named state dict's shapes (``overrides`` win)."""
    num_tokens, dim = _require(state, "token_emb.weight", source).shape
    layers = {int(m.group(1)) for k in state if (m := _OUR_LAYER.match(k))}
    if not layers:
        raise CheckpointError(f"{source} has no Performer layers ('performer.net.layers.0.*').")
    depth = max(layers) + 1
    projection = _require(state, "performer.layers.0.self_attn.projection_matrix", source)
    nb_features, dim_head = projection.shape
    inner = _require(state, "performer.layers.0.self_attn.to_q.weight", source).shape[0]
    d_ff = _require(state, "performer.layers.0.linear1.weight", source).shape[0]
    fields: dict[str, Any] = {"num_tokens": int(num_tokens), "dim": int(dim), "depth": depth,
                              "heads": int(inner // dim_head), "dim_head": int(dim_head),
                              "nb_features": int(nb_features), "ff_mult": int(d_ff // dim)}
    if "pos_emb.emb.weight" in state:
        fields["max_seq_len"] = int(state["pos_emb.emb.weight"].shape[0])
    if "to_out.fc3.weight" in state:
        fields["n_classes"] = int(state["to_out.fc3.weight"].shape[0])
        fields["head_hidden1"], fields["max_seq_len"] = (int(s) for s in _require(state, "to_out.fc1.weight",
                                                                                    source).shape)
        fields["head_hidden2"] = int(_require(state, "to_out.fc2.weight", source).shape[0])
    fields.update(overrides)
    return ScBERTConfig(**fields)


def load_gene2vec(gene2vec: str | os.PathLike | np.ndarray | torch.Tensor, *, panel_size: int, dim: int) -> torch.Tensor:
    """The gene2vec table ``[panel_size, dim]`` (``.npy`` path or array; rows in panel order) with
    scBERT's zero row appended: ``[panel_size + 1, dim]`` float32. A table that already has the zero
    row is accepted too. A ``.npy`` holding an object array (a pickle) raises
    :class:`~scforge.errors.UnsafeFileError`; nothing from it runs."""
    where = "the gene2vec array"
    if isinstance(gene2vec, (str, os.PathLike)):
        path = Path(gene2vec)
        where = f"the gene2vec file '{path}'"
        if not path.is_file():
            raise CheckpointError(f"{where} does not exist. scBERT needs gene2vec_16906.npy (one 200-d row per "
                                  "panel gene, in panel order) unless the checkpoint holds 'pos_emb.emb.weight'.")
        from scforge.hub import safe_numpy_load, verify_file_checksum

        verify_file_checksum(path)
        array = safe_numpy_load(path, what="gene2vec")  # allow_pickle=False: object arrays are refused
        if not isinstance(array, np.ndarray):
            raise CheckpointError(f"{where} is an .npz archive; pass the gene2vec table as a plain .npy array "
                                  "(np.save).")
    else:
        array = gene2vec.detach().cpu().numpy() if isinstance(gene2vec, torch.Tensor) else np.asarray(gene2vec)
    if array.ndim != 2 or array.shape[1] != dim or array.shape[0] not in (panel_size, panel_size + 1):
        raise CheckpointError(f"{where} has shape {array.shape}, expected ({panel_size}, {dim}): one {dim}-d row "
                              f"per gene of the {panel_size}-gene panel, in panel order.")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise CheckpointError(f"{where} must hold finite floating-point values (dtype {array.dtype}).")
    table = torch.as_tensor(np.asarray(array, dtype=np.float32))
    if table.shape[0] == panel_size + 1:
        if table[-1].abs().max() > 0:
            raise CheckpointError(f"{where} has {panel_size + 1} rows but the last is not the zero row scBERT "
                                  f"appends; pass the {panel_size}-row gene2vec table.")
        return table
    return torch.cat([table, table.new_zeros(1, dim)])


@dataclass
class LoadReport:
    """What loading a checkpoint did: tensors loaded, where the positions came from, dtype casts."""

    source: str
    layout: str
    head: str
    positions: str  # "checkpoint", "gene2vec file" or "none"
    loaded: list[str] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.source} ({self.layout} layout): {len(self.loaded)} tensors loaded; head: {self.head}; "
                 f"gene2vec positions from: {self.positions}"]
        if self.cast:
            lines.append(f"  converted to float32: {', '.join(self.cast[:6])}")
        return "\n".join(lines)

    __str__ = summary


def load_state_into(model: ScBERTModel, state: Mapping[str, torch.Tensor], *, source: str, layout: str = "scbert",
                    gene2vec: str | os.PathLike | np.ndarray | torch.Tensor | None = None) -> LoadReport:
    """Load a scforge-named state dict into ``model`` strictly: every tensor present and of the right
    shape (the error names the key). ``pos_emb.emb.weight`` may instead come from ``gene2vec``;
    ``calls_since_last_redraw`` is optional."""
    own = model.state_dict()
    c = model.config
    state = dict(state)
    positions = "none"
    if model.pos_emb is not None:
        if "pos_emb.emb.weight" in state:
            positions = "checkpoint"
            if gene2vec is not None:
                given = load_gene2vec(gene2vec, panel_size=c.panel_size, dim=c.dim)
                if given.shape != state["pos_emb.emb.weight"].shape or not torch.allclose(
                        given, state["pos_emb.emb.weight"].float(), atol=1e-5):
                    logger.warning("%s: the gene2vec table given differs from the checkpoint's pos_emb.emb.weight; "
                                   "using the checkpoint's (the one the model was trained with).", source)
        elif gene2vec is not None:
            state["pos_emb.emb.weight"] = load_gene2vec(gene2vec, panel_size=c.panel_size, dim=c.dim)
            positions = "gene2vec file"
        else:
            raise CheckpointError(f"{source} has no 'pos_emb.emb.weight' (the gene2vec positions) and no gene2vec "
                                  "file was given; pass gene2vec='gene2vec_16906.npy'.")
    state.setdefault("calls_since_last_redraw", own["calls_since_last_redraw"])
    report = LoadReport(source=source, layout=layout, positions=positions,
                        head=f"classifier ({c.n_classes} classes)" if c.n_classes else "pretraining (to_out)")
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensors this scBERT model needs: {missing[:6]}. "
                              "The file is incomplete, or its architecture differs.")
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(f"{source} holds tensors this scBERT model has no place for: {extra[:6]} (e.g. a "
                              "classification head loaded into a pretraining model, or more layers).")
    merged = {}
    for key, target in own.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: '{key}' is a {type(tensor).__name__}, not a tensor.")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(target.shape)}. Check the gene panel / max_seq_len and the head.")
        if tensor.dtype != target.dtype:
            if tensor.is_floating_point() != target.is_floating_point():
                raise CheckpointError(f"{source}: '{key}' has dtype {tensor.dtype}, expected {target.dtype}.")
            if tensor.is_floating_point():
                report.cast.append(key)
            tensor = tensor.to(target.dtype)
        merged[key] = tensor
        report.loaded.append(key)
    model.load_state_dict(merged, strict=True)
    logger.info("%s", report.summary())
    return report
