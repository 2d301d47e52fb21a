"""Perturbation benchmark: scforge's perturbation model against scGPT's ``TransformerGenerator``.

    python benchmarks/perturb.py            # 3 rounds of 4 steps, 32-cell batches, 500 genes
    python benchmarks/perturb.py --quick    # 1 round of 2 steps, 200 genes, no text or accuracy parts

1. Training throughput. Both sides: the same architecture (4 layers x 256, 8 heads, FFN 512,
   dropout 0, affine decoder, ``pert_pad_id=0`` as scGPT's perturbation tutorial), the same initial
   weights (the reference is built, its state dict is copied into scforge), the same batches:
   real ifnb cells (``layers['lognorm']``, the 500 most variable genes + IFNB1), each STIM cell paired
   with a random CTRL cell of its cell type, ``IFNB1`` flagged as the perturbed gene. A step is
   forward, MSE over all genes, backward, clip to norm 1.0, Adam step; fp32, train mode. Rounds
   alternate reference and scforge; medians over rounds. Before timing, one forward and backward on
   the first batch checks that both sides compute the same loss and gradient norm.
   Reference: ``scgpt.model.generation_model.TransformerGenerator`` from the scgpt 0.2.4 wheel (its
   PyTorch path; flash-attn is not installed). scforge: ``ScGPTPerturbModel`` on the shared core.
   Also timed once: ``PerturbationModel.fit`` end to end (data pairing, collation, Lightning) for one
   epoch on a seeded 400-cell subsample.
2. Time to embed gene texts: GO-all "concat" texts of every ifnb gene with a GO annotation, embedded
   with the shipped all-MiniLM-L6-v2 (``scforge.genes.text``), without cache, then from the cache.
3. Accuracy: one held-out cell type (CD14 Mono STIM), scGPT-family model from the default pretrained
   weights, the settings of scripts/perturb_ifnb.py (3 epochs, 128 genes per minibatch); Pearson delta
   over the top-20 DE genes against the type's own CTRL mean (the full study is that script).

Ends with ``RESULT perturb speedup_vs_scgpt=<x> pearson_delta_de=<p> ...``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IFNB = SHARED / "ifnb" / "ifnb_sub_2000.h5ad"


def ifnb_data(n_genes: int, n_cells: int | None = None):
    """The ifnb perturbation data of scripts/perturb_ifnb.py; ``n_cells``: a seeded subsample."""
    import anndata as ad

    sys.path.insert(0, str(ROOT / "scripts"))
    from perturb_ifnb import ifnb_perturbation_data

    adata = ad.read_h5ad(IFNB)
    if n_cells is not None:
        adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, n_cells, replace=False))].copy()
    return ifnb_perturbation_data(adata, n_genes=n_genes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--genes", type=int, default=500)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.genes = 1, 2, 200
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.perf_counter()

    from scforge.data.perturbation import pair_controls
    from scforge.models.scgpt.perturbation import PerturbConfig, ScGPTPerturbModel, published_to_scforge
    from scforge.tasks.perturb import PerturbationModel
    from scforge.testing.scgpt_reference import load_scgpt_generation_module

    data = ifnb_data(args.genes)
    model = PerturbationModel.new(None, data.gene_names, d_model=256, n_heads=8, d_hid=512, n_layers=4, dropout=0.0)
    vocab = model.vocab
    gm = load_scgpt_generation_module()
    torch.manual_seed(0)
    ref = gm.TransformerGenerator(ntoken=len(vocab), d_model=256, nhead=8, d_hid=512, nlayers=4, nlayers_cls=3,
                                  n_cls=1, vocab={"<pad>": vocab.special_id("pad")}, dropout=0.0, pad_token="<pad>",
                                  pad_value=0, pert_pad_id=0)
    cfg = model.config
    sf = ScGPTPerturbModel(PerturbConfig(**{**cfg.to_dict(), "text_sources": (), "text_dims": ()}))
    sf.load_state_dict({k: v for k, v in published_to_scforge(ref.state_dict(), cfg).items()
                        if not k.startswith("cls_decoder.")}, strict=True)

    # the same batches for both sides: STIM cells paired with a CTRL cell of their type
    rng = np.random.default_rng(0)
    stim = np.concatenate([data.cells("STIM", c) for c in data.contexts])
    rows = rng.permutation(stim)[: args.batch * args.steps]
    inputs = pair_controls(data, rows, seed=0)
    X = data.expression(np.arange(data.n_cells))
    genes = torch.as_tensor(model.gene_ids)
    flags_row = torch.as_tensor(model.flags_for(("IFNB1",)))
    batches = []
    for i in range(args.steps):
        sl = slice(i * args.batch, (i + 1) * args.batch)
        b = rows[sl].size
        batches.append((genes.expand(b, -1).contiguous(), torch.as_tensor(X[inputs[sl]]),
                        flags_row.expand(b, -1).contiguous(), torch.as_tensor(X[rows[sl]])))
    mask = torch.zeros(batches[0][0].shape, dtype=torch.bool)

    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-4)
    sf_opt = torch.optim.Adam(sf.parameters(), lr=1e-4)

    def ref_loss(i: int) -> torch.Tensor:
        g, v, f, y = batches[i]
        return torch.nn.functional.mse_loss(ref(g, v, f, mask[: g.shape[0]])["mlm_output"], y)

    def sf_loss(i: int) -> torch.Tensor:
        g, v, f, y = batches[i]
        return torch.nn.functional.mse_loss(sf(g, v, f)["pred"], y)

    def step(loss_fn, params, opt, i: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    ref.eval()
    sf.eval()
    l_ref, l_sf = ref_loss(0), sf_loss(0)
    l_ref.backward()
    l_sf.backward()
    g_ref = float(torch.norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None])))
    g_sf = float(torch.norm(torch.stack([p.grad.norm() for p in sf.parameters() if p.grad is not None])))
    loss_rel = abs(l_ref.item() - l_sf.item()) / abs(l_ref.item())
    grad_rel = abs(g_ref - g_sf) / g_ref
    print(f"first batch: loss {l_ref.item():.6f} vs {l_sf.item():.6f} (rel {loss_rel:.1e}); "
          f"gradient norm {g_ref:.5f} vs {g_sf:.5f} (rel {grad_rel:.1e})")
    ref.train()
    sf.train()
    ref_params, sf_params = list(ref.parameters()), list(sf.parameters())
    step(ref_loss, ref_params, ref_opt, 0)  # warm-up, untimed
    step(sf_loss, sf_params, sf_opt, 0)

    rates: dict[str, list[float]] = {"ref": [], "scforge": []}
    for r in range(args.rounds):
        for name, fn, params, opt in (("ref", ref_loss, ref_params, ref_opt), ("scforge", sf_loss, sf_params, sf_opt)):
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(fn, params, opt, i)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))
        print(f"round {r + 1}: reference {rates['ref'][-1]:.1f} cells/s  scforge {rates['scforge'][-1]:.1f} cells/s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    speedup = med["scforge"] / med["ref"]

    # end to end: PerturbationModel.fit (pairing, collation, Lightning), one epoch on a 400-cell subsample
    small = ifnb_data(args.genes, n_cells=400)
    model = PerturbationModel.new(None, small.gene_names, d_model=256, n_heads=8, d_hid=512, n_layers=4, dropout=0.0)
    t0 = time.perf_counter()
    model.fit(small, train=[("STIM", c) for c in small.contexts if small.cells("STIM", c).size], epochs=1,
              batch_size=args.batch, seed=0, max_seq_len=args.genes)
    n_pairs = sum(small.cells("STIM", c).size for c in small.contexts) + small.control_cells(None).size
    fit_rate = n_pairs / (time.perf_counter() - t0)
    print(f"PerturbationModel.fit end to end: {n_pairs} pairs in {n_pairs / fit_rate:.1f} s = {fit_rate:.1f} cells/s")

    text_line = ""
    pdd = float("nan")
    if not args.quick:
        text_line = text_embedding_timing()
        pdd = heldout_accuracy(500)
    print(f"wall time {time.perf_counter() - t_start:.0f} s")
    print(f"RESULT perturb speedup_vs_scgpt={speedup:.2f} pearson_delta_de={pdd:.3f} "
          f"cells_per_s={med['scforge']:.1f} ref_cells_per_s={med['ref']:.1f} fit_cells_per_s={fit_rate:.1f} "
          f"loss_match={loss_rel:.1e} grad_norm_match={grad_rel:.1e}{text_line}")


def text_embedding_timing() -> str:
    import anndata as ad

    from scforge.genes.text import embed_gene_texts, gene_texts

    genes = list(ad.read_h5ad(IFNB, backed="r").var_names)
    t0 = time.perf_counter()
    texts = gene_texts(SHARED / "genes" / "go", genes, kind="go_all", style="concat")
    t_text = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        emb = embed_gene_texts(texts, cache_dir=cache)
        t_embed = time.perf_counter() - t0
        t0 = time.perf_counter()
        embed_gene_texts(texts, cache_dir=cache)
        t_cached = time.perf_counter() - t0
    print(f"gene texts: {len(texts)} of {len(genes)} ifnb genes have GO annotations; texts built in {t_text:.1f} s, "
          f"embedded ({emb.dim}-d MiniLM) in {t_embed:.1f} s = {len(texts) / t_embed:.0f} genes/s; from cache "
          f"{t_cached:.2f} s")
    return f" text_genes={len(texts)} text_embed_s={t_embed:.1f} text_cached_s={t_cached:.2f}"


def heldout_accuracy(n_genes: int) -> float:
    sys.path.insert(0, str(ROOT / "scripts"))
    from perturb_ifnb import run_one

    rows = run_one("CD14 Mono", "scgpt_pretrained", seed=0, n_genes=n_genes, epochs=3, max_seq_len=128)
    value = float(rows.query("metric == 'pearson_delta_de_ctx'")["value"].iloc[0])
    print(f"held-out CD14 Mono STIM, scGPT-family perturbation model (default weights, 3 epochs): "
          f"pearson_delta_de {value:.3f}")
    return value


if __name__ == "__main__":
    main()
