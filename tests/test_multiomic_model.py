"""Multi-omic scGPT module: parity with the reference MultiOmicTransformerModel (scgpt 0.2.4 wheel)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

from scforge.errors import ConfigError
from scforge.models.scgpt import to_scforge_keys
from scforge.models.scgpt.multiomic import MultiOmicConfig, MultiOmicScGPTModel

VOCAB_SIZE, PAD_ID, CLS_ID = 40, 0, 1
MOD_PAD, MOD_CLS = 0, 1  # modality vocabulary: <pad>, <cls>, <rna>, <adt>, <atac>
SIZES = {"d_model": 32, "n_heads": 4, "d_hid": 48, "n_layers": 2}


def reference_multiomic(**kwargs):
    """scGPT's own MultiOmicTransformerModel (PyTorch attention path), eval mode."""
    from scforge.testing.scgpt_reference import load_scgpt_model_module

    load_scgpt_model_module()  # registers the bare `scgpt` and `scgpt.model` packages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = sys.modules.get("scgpt.model.multiomic_model") or importlib.import_module(
            "scgpt.model.multiomic_model")
    args = {"ntoken": VOCAB_SIZE, "d_model": 32, "nhead": 4, "d_hid": 48, "nlayers": 2,
            "vocab": {"<pad>": PAD_ID}, "dropout": 0.2, "pad_token": "<pad>", "pad_value": -2, "do_mvc": True,
            "use_mod": True, "ntokens_mod": 5, "vocab_mod": {"<pad>": MOD_PAD}}
    args.update(kwargs)
    return module.MultiOmicTransformerModel(**args).eval()


def twin(ref, **config) -> MultiOmicScGPTModel:
    base = {"vocab_size": VOCAB_SIZE, "pad_token_id": PAD_ID, "n_mod_tokens": 5, "mod_pad_id": MOD_PAD, **SIZES}
    base.update(config)
    model = MultiOmicScGPTModel(MultiOmicConfig(**base)).eval()
    theirs = to_scforge_keys(ref.state_dict())
    assert set(theirs) == set(model.state_dict())  # the same parameter names as the reference
    model.load_state_dict(theirs, strict=True)
    return model


def padded_batch(seed: int = 0):
    """Four cells of different lengths: <cls>, RNA tokens (mod 2), protein tokens (mod 3), padding;
    one cell has no protein tokens (a missing modality)."""
    g = torch.Generator().manual_seed(seed)
    lengths, n_rna = [12, 9, 7, 12], [7, 5, 6, 4]
    L = max(lengths)
    genes = torch.full((4, L), PAD_ID)
    values = torch.full((4, L), -2.0)
    mods = torch.full((4, L), MOD_PAD)
    for i, (n, r) in enumerate(zip(lengths, n_rna)):
        genes[i, 0], values[i, 0], mods[i, 0] = CLS_ID, 0.0, MOD_CLS
        genes[i, 1:n] = torch.randperm(VOCAB_SIZE - 2, generator=g)[: n - 1] + 2
        values[i, 1:n] = torch.randint(1, 51, (n - 1,), generator=g).float()
        mods[i, 1 : 1 + r] = 2
        mods[i, 1 + r : n] = 3
    return genes, values, genes == PAD_ID, mods


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("case", ["mod", "mod+batch", "zero_prob", "avg-pool", "batch_only"])
def test_outputs_equal_reference(case):
    ref_kwargs: dict = {}
    ours: dict = {}
    if case in ("mod+batch", "batch_only"):
        ref_kwargs = {"use_batch_labels": True, "num_batch_labels": 3, "do_dab": True}
        ours = {"use_batch_labels": True, "num_batch_labels": 3, "do_dab": True}
    if case == "batch_only":
        ref_kwargs.update(use_mod=False)
        ours.update(use_mod=False)
    if case == "zero_prob":
        ref_kwargs = ours = {"explicit_zero_prob": True}
    if case == "avg-pool":
        ref_kwargs, ours = {"cell_emb_style": "avg-pool"}, {"cell_emb_style": "avg-pool"}
    torch.manual_seed(0)
    ref = reference_multiomic(**ref_kwargs)
    model = twin(ref, **ours)
    genes, values, pad, mods = padded_batch()
    if case == "avg-pool":  # the reference averages padding too: compare on equal-length cells
        genes, values, pad, mods = genes[[0, 3]], values[[0, 3]], pad[[0, 3]], mods[[0, 3]]
    batch = torch.tensor([0, 2, 1, 2])[: genes.shape[0]] if "batch" in case else None
    mod_types = None if case == "batch_only" else mods
    with torch.no_grad():
        theirs = ref(genes, values, pad, batch_labels=batch, MVC=True, CLS=True, mod_types=mod_types)
        mine = model(genes, values, pad, batch_labels=batch, MVC=True, CLS=True, mod_types=mod_types)
    keys = {"mlm_output", "cell_emb", "mvc_output", "cls_output"}
    keys |= {"mlm_zero_probs", "mvc_zero_probs"} if case == "zero_prob" else set()
    keys |= {"dab_output"} if "batch" in case else set()
    for key in keys:
        a, b = theirs[key], mine[key]
        if key in ("mlm_output", "mvc_output", "mlm_zero_probs", "mvc_zero_probs"):
            a, b = a[~pad], b[~pad]  # padded positions are never read
        assert close(a, b), (case, key, float((a - b).abs().max()))


def test_mod_types_change_decoders_not_the_cell_embedding():
    torch.manual_seed(1)
    model = MultiOmicScGPTModel(MultiOmicConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, **SIZES)).eval()
    genes, values, pad, mods = padded_batch(seed=3)
    other = torch.where(mods == 2, torch.full_like(mods, 4), mods)  # call the RNA tokens ATAC
    with torch.no_grad():
        a = model(genes, values, pad, mod_types=mods, MVC=True)
        b = model(genes, values, pad, mod_types=other, MVC=True)
        emb = model.cell_embeddings(genes, values, pad)
    assert torch.equal(a["cell_emb"], b["cell_emb"])
    assert not close(a["mlm_output"][~pad], b["mlm_output"][~pad], 1e-4)
    assert not close(a["mvc_output"][~pad], b["mvc_output"][~pad], 1e-4)
    assert torch.allclose(emb, torch.nn.functional.normalize(a["cell_emb"], dim=1), atol=1e-6)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4))


def test_state_dict_round_trips_through_published_layout():
    from scforge.models.scgpt import to_published_keys

    torch.manual_seed(2)
    model = MultiOmicScGPTModel(MultiOmicConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, **SIZES))
    flash = to_published_keys(model.state_dict(), "flash")
    assert "mod_encoder.embedding.weight" in flash and flash["decoder.fc.0.weight"].shape == (32, 64)
    assert flash["mvc_decoder.gene2query.weight"].shape == (64, 64) and flash["mvc_decoder.W.weight"].shape == (64, 64)
    again = MultiOmicScGPTModel(MultiOmicConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, **SIZES))
    again.load_state_dict(to_scforge_keys(flash), strict=True)
    assert torch.equal(again.mod_encoder.embedding.weight, model.mod_encoder.embedding.weight)
    assert torch.all(model.mod_encoder.embedding.weight[MOD_PAD] == 0)  # padding_idx row


def test_bad_inputs_are_clear():
    model = MultiOmicScGPTModel(MultiOmicConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, **SIZES)).eval()
    genes, values, pad, mods = padded_batch()
    with pytest.raises(ValueError, match="needs mod_types"):
        model(genes, values, pad)
    with pytest.raises(ValueError, match="must match genes"):
        model(genes, values, pad, mod_types=mods[:, :3])
    with pytest.raises(ValueError, match="batch_labels given"):
        model(genes, values, pad, batch_labels=torch.zeros(4, dtype=torch.long), mod_types=mods)
    with pytest.raises(ConfigError, match="mod_pad_id"):
        MultiOmicConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, n_mod_tokens=3, mod_pad_id=5, **SIZES)
