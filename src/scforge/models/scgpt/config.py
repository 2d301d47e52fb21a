"""scGPT configuration: the fields of the reference ``TransformerModel`` and of its ``args.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from scforge.models._config import DictConfig
from scforge.errors import CheckpointError, ConfigError

INPUT_EMB_STYLES = ("continuous", "category", "scaling")
CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")
MVC_STYLES = ("inner product", "inner product, detach", "concat query", "sum query")


@dataclass
class ScGPTConfig(DictConfig):
    """Architecture and input conventions of an scGPT model.

    Names follow the reference ``TransformerModel`` arguments; :meth:`from_args_json` reads the
    published ``args.json`` (``embsize``, ``nheads``, ``d_hid``, ``nlayers``, ``n_layers_cls``, ...).
    ``expected_input`` says what ``embed`` should be given: ``"counts"`` (published models:
    scGPT's ``embed_data`` bins raw counts) or ``"log1p"`` (models fine-tuned on log-normalised data).
    """

    vocab_size: int
    pad_token_id: int
    d_model: int = 512
    n_heads: int = 8
    d_hid: int = 512
    n_layers: int = 12
    n_layers_cls: int = 3
    n_cls: int = 1
    dropout: float = 0.2
    pad_token: str = "<pad>"
    pad_value: float = -2.0
    mask_value: float = -1.0
    n_bins: int = 51
    input_emb_style: str = "continuous"
    cell_emb_style: str = "cls"
    mvc_decoder_style: str = "inner product"
    do_mvc: bool = True
    do_dab: bool = False
    use_batch_labels: bool = False
    num_batch_labels: int | None = None
    domain_spec_batchnorm: bool | str = False
    explicit_zero_prob: bool = False
    ecs_threshold: float = 0.3
    norm_scheme: str = "post"
    use_generative: bool = False
    max_seq_len: int = 1200
    expected_input: str = "counts"

    def __post_init__(self) -> None:
        checks = [
            (self.input_emb_style in INPUT_EMB_STYLES, f"input_emb_style must be one of {INPUT_EMB_STYLES}"),
            (self.cell_emb_style in CELL_EMB_STYLES, f"cell_emb_style must be one of {CELL_EMB_STYLES}"),
            (self.mvc_decoder_style in MVC_STYLES, f"mvc_decoder_style must be one of {MVC_STYLES}"),
            (self.norm_scheme in ("post", "pre", "scgpt_pre"), "norm_scheme must be 'post', 'pre' or 'scgpt_pre'"),
            (self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}"),
            (0 <= self.pad_token_id < self.vocab_size, f"pad_token_id={self.pad_token_id} outside the vocabulary"),
            (self.expected_input in ("counts", "log1p"), "expected_input must be 'counts' or 'log1p'"),
            (not (self.use_batch_labels or self.domain_spec_batchnorm or self.do_dab) or bool(self.num_batch_labels),
             "use_batch_labels / domain_spec_batchnorm / do_dab need num_batch_labels"),
            (self.domain_spec_batchnorm in (False, True, "dsbn", "batchnorm"),
             "domain_spec_batchnorm must be False, True/'dsbn' or 'batchnorm'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"ScGPTConfig: {message}.")
        if self.input_emb_style == "category" and self.pad_value < 0:
            raise ConfigError("ScGPTConfig: input_emb_style='category' needs pad_value = n_bins and "
                              "mask_value = n_bins + 1 (non-negative bin ids), as scGPT sets them.")

    @property
    def n_input_bins(self) -> int:
        """Size of the category value embedding (``n_bins + 2``: bins, pad, mask)."""
        return self.n_bins + 2


    @classmethod
    def from_args_json(
        cls, args: str | os.PathLike | dict[str, Any], *, vocab_size: int, pad_token_id: int, **overrides: Any
    ) -> ScGPTConfig:
        """Config from scGPT's training ``args.json`` (a path or the parsed dict)."""
        if not isinstance(args, dict):
            try:
                with open(args) as f:
                    args = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"Could not read scGPT args.json '{args}': {exc}. It should be the "
                                      "JSON file shipped next to best_model.pt.") from exc
        missing = [k for k in ("embsize", "nheads", "d_hid", "nlayers") if k not in args]
        if missing:
            raise CheckpointError(f"scGPT args.json lacks {missing}; these define the architecture. Use the "
                                  "args.json that came with the checkpoint.")
        style = args.get("input_emb_style", "continuous")
        n_bins = int(args.get("n_bins", 51))
        pad_value = args.get("pad_value", -2)
        mask_value = args.get("mask_value", -1)
        if style == "category":  # scGPT overrides these for category inputs
            pad_value, mask_value = n_bins, n_bins + 1
        values: dict[str, Any] = {
            "vocab_size": vocab_size,
            "pad_token_id": pad_token_id,
            "d_model": int(args["embsize"]),
            "n_heads": int(args["nheads"]),
            "d_hid": int(args["d_hid"]),
            "n_layers": int(args["nlayers"]),
            "n_layers_cls": int(args.get("n_layers_cls", 3)),
            "dropout": float(args.get("dropout", 0.2)),
            "pad_token": str(args.get("pad_token", "<pad>")),
            "pad_value": float(pad_value),
            "mask_value": float(mask_value),
            "n_bins": n_bins,
            "input_emb_style": style,
            "norm_scheme": "scgpt_pre" if args.get("pre_norm") else "post",
            "max_seq_len": int(args.get("max_seq_len", 1200)),
            "do_mvc": bool(args.get("MVC", args.get("GEPC", True))),
            "use_generative": bool(args.get("USE_GENERATIVE_TRAINING", False)),
        }
        values.update(overrides)
        return cls(**values)
