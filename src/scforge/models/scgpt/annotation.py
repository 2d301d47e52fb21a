"""scGPT's side of the annotation task (:class:`~scforge.tasks.annotate.AnnotationBackend`).

Follows scGPT's annotation tutorial: values normalised to 1e4, log1p, per-cell bins, ``<cls>``
first with value 0, no masking, cross-entropy on the classifier applied to the ``<cls>`` output."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from scforge.errors import ConfigError
from scforge.tasks.annotate import AnnotationBackend
from scforge.tokenize.ragged import TokenizedCells


class ScGPTAnnotationBackend(AnnotationBackend):
    family = "scgpt"
    n_special = 1  # <cls>
    # sc-foundation-eval's "freeze" ablation: names containing "encoder" but not "transformer_encoder"
    embedding_prefixes = ("encoder.", "value_encoder.", "flag_encoder.")

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        c = model.config
        if c.use_batch_labels or c.domain_spec_batchnorm:
            raise ConfigError("this scGPT model needs batch labels (use_batch_labels / DSBN); annotation with batch "
                              "labels is not supported yet.")

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def n_classes(self) -> int | None:
        n = int(self.model.config.n_cls)
        return n if n >= 2 else None

    def settings(self, max_length: int | None, seed: int) -> dict[str, Any]:
        c = self.model.config
        length = max_length or c.max_seq_len
        if length < 2:
            raise ConfigError(f"max_length must be >= 2 (<cls> plus one gene), got {length}")
        return {"n_bins": c.n_bins, "normalize_total": 1e4, "log1p": True, "cls_value": 0.0, "max_len": int(length),
                "seed": int(seed), "pad_value": c.pad_value, "mask_value": c.mask_value}

    def check_input(self, adata: Any, layer: str | None) -> None:
        self.model._check_input(adata, layer, False)

    def tokenize(self, adata: Any, layer: str | None, settings: dict[str, Any], progress: bool) -> TokenizedCells:
        from scforge.tokenize import BinnedTokenizer

        s = settings
        tok = BinnedTokenizer(self.model.vocab, n_bins=s["n_bins"], normalize_total=s["normalize_total"],
                              log1p=s["log1p"], cls_value=s["cls_value"], max_len=s["max_len"], seed=s["seed"],
                              pad_value=s["pad_value"], mask_value=s["mask_value"])
        return tok.tokenize(adata, layer=layer, progress=progress)

    def classifier_copy(self, n_classes: int, seed: int, source: str) -> Any:
        from scforge.models.scgpt import ScGPT, ScGPTModel
        from scforge.models.scgpt.checkpoint import load_state_into

        config = dataclasses.replace(self.model.config, n_cls=n_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = ScGPTModel(config)
        state = {k: v for k, v in self.model.module.state_dict().items() if not k.startswith("cls_decoder.")}
        load_state_into(module, state, source=source, strict_heads=False)
        return ScGPT(module, copy.deepcopy(self.model.vocab), source=source)

    def training_module(self, optim: Any, class_weights: tuple[float, ...] | None) -> Any:
        from scforge.train import Objectives, ScGPTTrainingModule

        return ScGPTTrainingModule(self.model.module, Objectives(gep=False, cls=True, class_weights=class_weights),
                                   optim)

    def collate(self, cells: TokenizedCells, labels: np.ndarray, seed: int) -> Any:
        from scforge.train import CellCollator, Corruption

        c = self.model.config
        return CellCollator(cells, corruption=Corruption("none"), seed=seed, labels=labels, mask_value=c.mask_value,
                            pad_value=c.pad_value, pad_id=c.pad_token_id)

    def proba(self, cells: TokenizedCells, *, batch_size: int = 64, device: Any = "auto", precision: str = "auto",
              progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        from scforge.nn import autocast, resolve_device, resolve_precision

        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module = self.model.module.to(dev).eval()
        out = np.zeros((cells.n_cells, int(self.model.config.n_cls)), dtype=np.float32)
        order = np.argsort(-cells.lengths, kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
        with torch.inference_mode(), autocast(dev, dtype):
            for idx in tqdm(batches, desc="scGPT annotate", unit="batch", disable=not progress, leave=False):
                b = cells.pack(idx)
                values = b["values"].to(dev)
                cu = b["cu_seqlens"].to(dev, torch.int64)
                h = module.encode(b["genes"].to(dev), values, cu_seqlens=cu, max_seqlen=b["max_seqlen"])
                logits = module.cls_decoder(module.cell_embedding(h, values, cu_seqlens=cu))
                out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    def embed(self, adata: Any, layer: str | None, *, batch_size: int = 64, device: Any = "auto",
              precision: str = "auto", max_length: int | None = None, seed: int = 0, check_input: bool = True,
              progress: bool = True) -> np.ndarray:
        return self.model.embed(adata, layer, batch_size=batch_size, key_added="", device=device, precision=precision,
                                max_length=max_length, normalize=True, seed=seed, check_input=check_input,
                                progress=progress)
