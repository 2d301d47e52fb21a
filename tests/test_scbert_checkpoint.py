"""Loading scBERT ``.pth`` checkpoints (published layouts), gene2vec files, and scforge folders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from scforge.errors import CheckpointError, ConfigError, UnsafeFileError
from scforge.models.scbert import ScBERT, load_gene2vec, read_published_state, to_published_keys, to_scforge_keys
from scbert_helpers import PublishedHead, published_state, random_gene2vec, reference_lm, save_published

N_GENES = 99
PANEL = [f"GENE{i}" for i in range(N_GENES)]  # names only matter for tokenizing, not for loading


def _ref(seed: int = 0, **kw):
    return reference_lm(dim=16, depth=2, heads=2, dim_head=8, nb_features=10, seq_len=N_GENES + 1,
                        gene2vec=random_gene2vec(N_GENES, 16, seed), seed=seed, **kw)


def _tokens(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 7, (n, N_GENES + 1), generator=torch.Generator().manual_seed(4))


def _close(model: ScBERT, ref) -> bool:
    x = _tokens()
    with torch.no_grad():
        return bool((model.module(x) - ref(x)).abs().max() < 1e-5)


def test_pretrained_checkpoint_with_optimizer_and_scheduler_state_loads(tmp_path):
    ref = _ref()
    path = save_published(ref, tmp_path / "panglao_pretrained.pth")
    model = ScBERT.from_published(path, gene_panel=PANEL)
    assert _close(model, ref)
    assert model.report.positions == "checkpoint" and "pos_emb.emb.weight" in model.report.cast
    assert model.module.pos_emb.emb.weight.dtype == torch.float32
    assert not model.module.pos_emb.emb.weight.requires_grad
    for i, layer in enumerate(model.module.performer.layers):  # the file's random features, not a new draw
        expected = ref.state_dict()[f"performer.net.layers.{i}.0.fn.fast_attention.projection_matrix"]
        assert torch.equal(layer.self_attn.projection_matrix, expected)


def test_module_prefix_bare_state_and_pypi_layout_load(tmp_path):
    ref = _ref()
    bare = save_published(ref, tmp_path / "ddp.pth", prefix="module.", bare=True)
    assert _close(ScBERT.from_published(bare, gene_panel=PANEL), ref)
    torch.save(ref.state_dict(), tmp_path / "pypi.pth")  # performer-pytorch 1.x: proj_updater copies
    model = ScBERT.from_published(tmp_path / "pypi.pth", gene_panel=PANEL)
    assert model.report.layout == "performer" and _close(model, ref)


def test_finetuned_checkpoint_and_label_dict(tmp_path):
    ref = _ref()
    torch.manual_seed(3)
    ref.to_out = PublishedHead(16, N_GENES + 1, n_classes=3).eval()
    path = save_published(ref, tmp_path / "finetuned.pth")
    classes = np.unique(np.array(["T cell", "B cell", "NK"]))
    with open(tmp_path / "label_dict", "wb") as f:
        pickle.dump(classes, f)
    model = ScBERT.from_published(path, gene_panel=PANEL, label_dict=tmp_path / "label_dict")
    assert model.classes == ["B cell", "NK", "T cell"] and model.config.n_classes == 3
    assert _close(model, ref)


def test_gene2vec_file_fills_missing_positions(tmp_path):
    ref = _ref()
    state = {k: v for k, v in published_state(ref).items() if k != "pos_emb.emb.weight"}
    torch.save({"model_state_dict": state}, tmp_path / "no_pos.pth")
    g2v = ref.pos_emb.emb.weight[:-1].detach().numpy()
    np.save(tmp_path / "gene2vec.npy", g2v)
    with pytest.raises(CheckpointError, match="gene2vec"):
        ScBERT.from_published(tmp_path / "no_pos.pth", gene_panel=PANEL)
    model = ScBERT.from_published(tmp_path / "no_pos.pth", gene_panel=PANEL, gene2vec=tmp_path / "gene2vec.npy")
    assert model.report.positions == "gene2vec file" and _close(model, ref)


def test_gene2vec_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gene2vec(tmp_path / "missing.npy", panel_size=5, dim=4)
    np.save(tmp_path / "bad.npy", np.zeros((6, 3)))
    with pytest.raises(CheckpointError, match=r"shape \(6, 3\), expected \(5, 4\)"):
        load_gene2vec(tmp_path / "bad.npy", panel_size=5, dim=4)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeFileError, match="object array"):  # a pickle: refused (tests/test_checkpoint_safety.py)
        load_gene2vec(tmp_path / "obj.npy", panel_size=5, dim=4)
    table = load_gene2vec(np.ones((5, 4)), panel_size=5, dim=4)
    assert table.shape == (6, 4) and table[-1].abs().sum() == 0 and table.dtype == torch.float32


def test_missing_and_misshaped_tensors_name_the_key(tmp_path):
    state = published_state(_ref())
    missing = dict(state)
    del missing["performer.net.layers.1.0.fn.fast_attention.projection_matrix"]
    torch.save({"model_state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="projection_matrix"):
        ScBERT.from_published(tmp_path / "missing.pth", gene_panel=PANEL)
    bad = dict(state)
    bad["performer.net.layers.0.1.fn.fn.w2.weight"] = torch.zeros(16, 63)
    torch.save({"model_state_dict": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"linear2.weight' has shape \(16, 63\)"):
        ScBERT.from_published(tmp_path / "bad.pth", gene_panel=PANEL)
    extra = dict(state, **{"performer.net.layers.0.0.fn.local_attn.rel_pos.weight": torch.zeros(2)})
    torch.save({"model_state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="local_attn"):
        ScBERT.from_published(tmp_path / "extra.pth", gene_panel=PANEL)


def test_panel_size_must_match_the_checkpoint(tmp_path):
    path = save_published(_ref(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="99-gene panel"):
        ScBERT.from_published(path, gene_panel=PANEL[:-1])


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path):
    control = tmp_path / "control_marker"
    torch.save({"x": _RunsCode(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)  # an unsafe load really runs the payload
    assert control.exists()
    marker = tmp_path / "marker"
    state = published_state(_ref())
    torch.save({"epoch": 1, "model_state_dict": state, "losses": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeFileError):
        ScBERT.from_published(tmp_path / "evil.pth", gene_panel=PANEL)
    assert not marker.exists()


def test_key_renaming_round_trips():
    state = published_state(_ref())
    ours = to_scforge_keys(state)
    assert "performer.layers.1.self_attn.projection_matrix" in ours and "calls_since_last_redraw" in ours
    assert to_published_keys(ours).keys() == state.keys()


def test_scforge_folder_round_trip(tmp_path):
    ref = _ref()
    torch.manual_seed(3)
    ref.to_out = PublishedHead(16, N_GENES + 1, n_classes=2).eval()
    model = ScBERT.from_published(save_published(ref, tmp_path / "m.pth"), gene_panel=PANEL,
                                  label_dict=["a", "b"])
    model.save(tmp_path / "folder")
    again = ScBERT.from_folder(tmp_path / "folder")
    assert again.classes == ["a", "b"] and again.panel.tokens == PANEL and _close(again, ref)
    model.save_published(tmp_path / "out.pth")
    state = read_published_state(tmp_path / "out.pth")
    assert state.keys() == published_state(ref).keys()
    with pytest.raises(ConfigError, match="class names"):
        ScBERT(again.module, again.panel, classes=["only one"])
