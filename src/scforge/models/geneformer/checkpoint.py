"""Published Geneformer checkpoints (HF BERT folders) in and out.

A published model is a ``transformers`` folder: ``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin`` (read only through :func:`scforge.hub.safe_torch_load`, which refuses
code-executing pickles). Both ``BertForMaskedLM`` (V1 and V2) and ``BertForSequenceClassification``
layouts load. HF names map to scforge's as follows (``{i}`` = layer):

=========================================================  ==========================================
HF                                                          scforge
=========================================================  ==========================================
``bert.embeddings.*``                                       ``bert.embeddings.*`` (same names)
``bert.encoder.layer.{i}.attention.self.{query,key,value}`` ``bert.encoder.layers.{i}.self_attn.Wqkv``
``...attention.output.dense`` / ``.LayerNorm``              ``...self_attn.out_proj`` / ``norm1``
``...intermediate.dense`` / ``output.dense``                ``...linear1`` / ``linear2``
``...output.LayerNorm``                                     ``...norm2``
``cls.predictions.transform.{dense,LayerNorm}``, ``.bias``  ``mlm_head.{dense,LayerNorm}``, ``.bias``
``bert.pooler.dense``, ``classifier``                       ``pooler``, ``classifier``
=========================================================  ==========================================

``bert.embeddings.position_ids`` (old files) is ignored; ``cls.predictions.decoder.weight`` is tied to
the word embeddings (absent from safetensors files) and ``cls.predictions.decoder.bias`` to ``.bias``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from scforge.errors import CheckpointError, ConfigError
from scforge.hub import safe_torch_load
from scforge.models.geneformer.config import GeneformerConfig
from scforge.models.geneformer.model import GeneformerForMaskedLM, GeneformerForSequenceClassification
from scforge.models.scgpt.checkpoint import LoadReport

logger = logging.getLogger("scforge")

LAYOUT = "hf-bert"
IGNORED_KEYS = ("bert.embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_LAYER_RENAMES = [
    ("attention.output.dense.", "self_attn.out_proj."),
    ("attention.output.LayerNorm.", "norm1."),
    ("intermediate.dense.", "linear1."),
    ("output.dense.", "linear2."),
    ("output.LayerNorm.", "norm2."),
]
_HEAD_RENAMES = [
    ("cls.predictions.transform.dense.", "mlm_head.dense."),
    ("cls.predictions.transform.LayerNorm.", "mlm_head.LayerNorm."),
    ("bert.pooler.dense.", "pooler."),
]
_HF_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^bert\.encoder\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"^attention\.self\.(query|key|value)\.(weight|bias)$")

GeneformerModel = GeneformerForMaskedLM | GeneformerForSequenceClassification


def _normalise_hf_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old TF-style ``gamma``/``beta`` LayerNorm names, and a bare ``BertModel``'s missing ``bert.``."""
    bare = not any(k.startswith("bert.") for k in state) and any(k.startswith("embeddings.") for k in state)
    out = {}
    for key, value in state.items():
        if bare and key.startswith(("embeddings.", "encoder.", "pooler.")):
            key = "bert." + key
        if ".LayerNorm." in key:
            key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
        out[key] = value
    return out


def from_hf_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF BERT names -> scforge names (q/k/v fused into ``Wqkv``). Returns the renamed tensors and the HF
    keys deliberately skipped (position ids, tied decoder); unknown keys pass through unchanged."""
    state = _normalise_hf_names(state)
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in IGNORED_KEYS:
            skipped.append(key)
            continue
        match = _HF_LAYER.match(key)
        if match:
            index, rest = match.groups()
            qkv_match = _QKV.match(rest)
            if qkv_match:
                qkv.setdefault((index, qkv_match.group(2)), {})[qkv_match.group(1)] = value
                continue
            for old, new in _LAYER_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"bert.encoder.layers.{index}.{rest}"] = value
            continue
        if key == "cls.predictions.bias":
            out["mlm_head.bias"] = value
            continue
        for old, new in _HEAD_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    for (index, kind), parts in sorted(qkv.items()):
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise CheckpointError(
                f"Layer {index} lacks bert.encoder.layer.{index}.attention.self.{missing[0]}.{kind}; the "
                "checkpoint is incomplete. Re-download it."
            )
        out[f"bert.encoder.layers.{index}.self_attn.Wqkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], 0)
    if "mlm_head.bias" not in out and "cls.predictions.decoder.bias" in state:
        out["mlm_head.bias"] = state["cls.predictions.decoder.bias"]
    return out, skipped


def to_hf_state_dict(state: Mapping[str, torch.Tensor], *, include_tied: bool = False) -> dict[str, torch.Tensor]:
    """scforge names -> HF BERT names (the inverse of :func:`from_hf_state_dict`). ``include_tied``
    adds ``cls.predictions.decoder.{weight,bias}`` as ``pytorch_model.bin`` files hold them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _OUR_LAYER.match(key)
        if match:
            index, rest = match.groups()
            prefix = f"bert.encoder.layer.{index}."
            if rest.startswith("self_attn.Wqkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("query", "key", "value"), value.chunk(3, 0)):
                    out[f"{prefix}attention.self.{name}.{kind}"] = part.contiguous()
                continue
            for old, new in _LAYER_RENAMES:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            out[prefix + rest] = value
            continue
        if key == "mlm_head.decoder.weight":
            continue
        if key == "mlm_head.bias":
            out["cls.predictions.bias"] = value
            if include_tied:
                out["cls.predictions.decoder.bias"] = value
                out["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
            continue
        for old, new in _HEAD_RENAMES:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out[key] = value
    return out


def _is_backbone(key: str) -> bool:
    return key.startswith("bert.")


def load_state_into(model: GeneformerModel, state: Mapping[str, torch.Tensor], *, source: str) -> LoadReport:
    """Load a scforge-named state dict; every backbone tensor must be present with the right shape
    (else :class:`CheckpointError` naming the key); heads absent from the file keep their fresh
    initialisation; all of it is listed in the returned :class:`LoadReport`."""
    own = {k: v for k, v in model.state_dict().items() if k != "mlm_head.decoder.weight"}
    missing = [k for k in own if _is_backbone(k) and k not in state]
    shaped = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or any(_is_backbone(k) for k, _, _ in shaped):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} backbone tensor(s): {', '.join(missing[:5])}")
        bad = [(k, a, b) for k, a, b in shaped if _is_backbone(k)]
        if bad:
            parts.append("mis-shaped: " + ", ".join(f"{k} file {a} vs model {b}" for k, a, b in bad[:5]))
        raise CheckpointError(
            f"{source} does not fit this Geneformer architecture: {'; '.join(parts)}. Check that config.json "
            "belongs to these weights (hidden_size, num_hidden_layers, vocab_size, max_position_embeddings)."
        )
    report = LoadReport(source=source, layout=LAYOUT)
    merged = {}
    for key, tensor in own.items():
        if key not in state:
            report.initialized.append(key)
        elif tuple(state[key].shape) != tuple(tensor.shape):
            report.mismatched.append((key, tuple(state[key].shape), tuple(tensor.shape)))
        else:
            merged[key] = state[key].to(tensor.dtype)
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in own]
    model.load_state_dict(merged, strict=False)
    if isinstance(model, GeneformerForMaskedLM):
        model.tie_weights()
    if report.initialized or report.mismatched or report.unexpected:
        logger.info("%s", report.summary())
    return report


def read_hf_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"'{folder}' has no config.json; a Geneformer model folder holds config.json and "
                              "model.safetensors or pytorch_model.bin.") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Cannot parse '{path}': {exc}. Re-download the model.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' does not hold a JSON object; it is not a HF config.json.")
    return data


def hf_weights_path(folder: str | os.PathLike) -> Path:
    """The weights file of a HF folder: ``model.safetensors`` if present, else ``pytorch_model.bin``."""
    folder = Path(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise CheckpointError(f"'{folder}' holds a sharded checkpoint; scforge reads single-file Geneformer "
                              "checkpoints (model.safetensors or pytorch_model.bin). Merge the shards first.")
    raise CheckpointError(f"'{folder}' has no model.safetensors or pytorch_model.bin.")


def read_hf_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a HF folder: ``model.safetensors`` if present, else ``pytorch_model.bin``
    (weights-only unpickling; code-executing files raise :class:`~scforge.errors.UnsafeFileError`).
    When the folder has a ``SHA256SUMS`` or a model card with sha256 lines, the weights file (and
    ``config.json``) must match them first (:func:`scforge.hub.verify_listed_checksums`)."""
    from scforge.hub import verify_listed_checksums

    path = hf_weights_path(folder)
    verify_listed_checksums(path.parent, [path.name, "config.json"])
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), path
        except Exception as exc:
            raise CheckpointError(f"Cannot read '{path}': {exc}. The file is truncated or corrupt; "
                                  "re-download it.") from None
    return safe_torch_load(path, what="Geneformer weights"), path


def load_hf_folder(folder: str | os.PathLike) -> tuple[GeneformerModel, LoadReport]:
    """Build and load a Geneformer model from a HF folder (MaskedLM, or SequenceClassification when
    the config or weights have a classifier). Listed sha256 digests are checked before the weights
    are deserialised (see :func:`read_hf_weights`)."""
    data = read_hf_config(folder)
    try:
        config = GeneformerConfig.from_hf_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {exc}") from None
    raw, path = read_hf_weights(folder)
    state, _ = from_hf_state_dict(raw)
    if "classifier.weight" in state:
        config.num_labels = int(state["classifier.weight"].shape[0])
    model: GeneformerModel = (GeneformerForSequenceClassification(config) if config.num_labels
                              else GeneformerForMaskedLM(config))
    report = load_state_into(model, state, source=str(path))
    return model, report


def write_hf_folder(model: GeneformerModel, folder: str | os.PathLike, *, safe_serialization: bool = True) -> Path:
    """Write ``model`` as a HF folder (``config.json`` + ``model.safetensors``, or ``pytorch_model.bin``)
    that ``transformers`` loads with ``from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hf = to_hf_state_dict(state, include_tied=not safe_serialization)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
    if safe_serialization:
        from safetensors.torch import save_file

        save_file({k: v.clone() for k, v in hf.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(hf, folder / "pytorch_model.bin")
    return folder

