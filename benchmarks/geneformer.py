"""Geneformer benchmark: rank-value tokenization and embedding throughput against reference paths.

    python benchmarks/geneformer.py            # 14k ifnb cells tokenized (5 rounds), 128 embedded (32 in bf16; 3 rounds)
    python benchmarks/geneformer.py --quick    # 2,000 / 16 cells (2 in bf16), 2 rounds (under a minute on 2 idle cores)
    python benchmarks/geneformer.py --tokenize-only   # part (a) alone

(a) Tokenization: scforge's ``RankValueTokenizer`` (V1 dictionaries, end to end from the AnnData) against
the published algorithm: the cell loop of ``TranscriptomeTokenizer.tokenize_anndata`` as shipped on PyPI in
``helical`` 2.2.0 (which cannot be installed beside this project: it pins torch 2.7.0, scipy 1.13.1 and
pandas 2.2.2), line for line: chunks of 512 cells taken as AnnData views, ``n_counts`` summed per chunk,
``X_view / n_counts * 1e4 / median`` as a sparse matrix, then per cell ``argsort(-x)`` of the row; first
2,048 tokens. A leaner variant that slices the CSR matrix directly is timed too. Both are given the gene-to-
token columns (the reference's gene matching is not timed; scforge's is reported both ways). Outputs are
checked equal up to tie order.

(b) Embedding at the V1 shape (6 x 256, 4 heads, 2,048 positions, 25,426 tokens), identical random weights:
``transformers`` ``BertModel`` (the backbone of ``BertForMaskedLM``, no MLM head) with
``attn_implementation="sdpa"``, fp32, padded batches of cells sorted by length, against scforge's packed
batches (``Geneformer.embed_cells``), both running all 6 layers and mean-pooling the last (checked equal).
The default ``emb_layer=-1`` (penultimate layer; scforge skips the last layer) is reported separately.
Same real ifnb cells with their real lengths, alternating runs, medians.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IFNB = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"
V1 = ROOT.parent / "shared" / "data" / "genes" / "geneformer_v1"


def reference_tokenize(X: sp.csr_matrix, token_of_column: np.ndarray, medians: np.ndarray, limit: int) -> list:
    """The published rule with the structure of ``TranscriptomeTokenizer.tokenize_anndata``: chunks of 512
    cells, ``X_view / n_counts * target_sum / norm_factor_vector`` as a sparse matrix, then per cell
    ``rank_genes(X_norm[i].data, tokens[X_norm[i].indices])`` (``argsort(-x)``), first ``limit``."""
    n_counts = np.asarray(X.sum(axis=1)).ravel()[:, None]
    keep = np.flatnonzero(token_of_column >= 0)
    tokens_k = token_of_column[keep]
    norm_factor_vector = medians[tokens_k]
    out = []
    for start in range(0, X.shape[0], 512):
        X_view = X[start:start + 512][:, keep]
        X_norm = sp.csr_matrix(X_view / n_counts[start:start + 512] * 10_000 / norm_factor_vector)
        for i in range(X_norm.shape[0]):
            x, genes = X_norm[i].data, tokens_k[X_norm[i].indices]
            out.append(genes[np.argsort(-x)][:limit])
    return out


def published_tokenize(adata, coding_miRNA_loc: np.ndarray, coding_miRNA_tokens: np.ndarray,
                       norm_factor_vector: np.ndarray, limit: int, target_sum: float = 10_000) -> list:
    """The cell loop of ``TranscriptomeTokenizer.tokenize_anndata`` (``helical`` 2.2.0) for data without an
    ``n_counts`` column, then each cell's first ``limit`` tokens (Geneformer truncates when it builds the
    dataset)."""
    filter_pass_loc = np.array([i for i in range(adata.shape[0])])
    tokenized_cells = []
    for i in range(0, len(filter_pass_loc), 512):
        idx = filter_pass_loc[i : i + 512]
        n_counts = adata[idx, :].X.sum(axis=1)
        X_view0 = adata[idx, :].X
        X_view = X_view0[:, coding_miRNA_loc]
        X_norm = (X_view / np.asarray(n_counts).reshape(-1, 1)) * target_sum / norm_factor_vector.reshape(1, -1)
        X_norm = sp.csr_matrix(X_norm)
        tokenized_cells += [
            coding_miRNA_tokens[X_norm[i].indices][np.argsort(-X_norm[i].data)] for i in range(X_norm.shape[0])
        ]
    return [cell[:limit] for cell in tokenized_cells]


def check_tokens(ours, ref, scores) -> None:
    """Equal up to the order of tied scores (ties within 1e-6 relative: the two compute the score with a
    different order of float operations, so near-exact ties can swap)."""
    for i, expected in enumerate(ref):
        got = ours.cell(i)[0]
        assert got.size == expected.size, i
        np.testing.assert_allclose(scores[i][got], scores[i][expected], rtol=1e-6)
        assert set(got.tolist()) == set(expected.tolist()), i


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokenize-only", action="store_true", help="skip the embedding part")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds (default 2 quick; full: 5 tokenizing, 3 embedding)")
    args = parser.parse_args()
    import anndata as ad
    import transformers

    from scforge.models.geneformer import GeneformerConfig
    from scforge.models.geneformer.api import Geneformer
    from scforge.tokenize import RankValueTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    rounds = args.rounds or (2 if args.quick else 3)
    tokenize_rounds = args.rounds or (2 if args.quick else 5)
    adata = ad.read_h5ad(IFNB)
    n_tok = 2000 if args.quick else adata.n_obs
    data = adata[:n_tok].copy()
    X = sp.csr_matrix(data.X)

    # ---- (a) tokenization ----
    tok = RankValueTokenizer(V1)  # default threads (all cores); the reference is single-threaded NumPy
    alignment = tok._align(__import__("scforge.matrix", fromlist=["as_source"]).as_source(data), None)
    token_of_column = np.asarray(alignment.token_ids, dtype=np.int64)
    medians = tok._medians
    from scforge.matrix import as_source
    from scforge.tokenize.ragged import TokenizedCells

    coding_miRNA_loc = np.flatnonzero(token_of_column >= 0)
    coding_miRNA_tokens = token_of_column[coding_miRNA_loc]
    norm_factor_vector = medians[coding_miRNA_tokens]
    # warm-up, untimed: one whole round of each side (compiled kernels, caches, and this VM's first touch of
    # fresh memory, which makes any first large run slower)
    tok.tokenize(data)
    published_tokenize(data, coding_miRNA_loc, coding_miRNA_tokens, norm_factor_vector, 2048)
    times = {"published": [], "ref": [], "scforge": [], "scforge_rank": []}
    for _ in range(tokenize_rounds):
        t0 = time.perf_counter()
        published = published_tokenize(data, coding_miRNA_loc, coding_miRNA_tokens, norm_factor_vector, 2048)
        times["published"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = reference_tokenize(X, token_of_column, medians, 2048)
        times["ref"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = tok.tokenize(data)
        times["scforge"].append(time.perf_counter() - t0)
        source = as_source(data)
        plan = tok._plan(source, None)  # gene matching, as the reference is given it
        t0 = time.perf_counter()
        ranked = tok._tokenize_whole(source, plan) or TokenizedCells.concat(list(tok._run_chunks(source, plan, False)))
        times["scforge_rank"].append(time.perf_counter() - t0)
    np.testing.assert_array_equal(ranked.gene_ids, ours.gene_ids)
    n_counts = np.asarray(X.sum(axis=1)).ravel()
    sample = range(0, n_tok, max(1, n_tok // 200))
    scores = {}
    for i in sample:
        s = np.zeros(len(medians))
        row = X[i]
        cols = token_of_column[row.indices]
        ok = cols >= 0
        np.add.at(s, cols[ok], row.data[ok])
        scores[i] = s / n_counts[i] * 10_000 / np.where(np.isfinite(medians), medians, 1)
    check_tokens(ours.select(list(sample)), [ref[i] for i in sample], [scores[i] for i in sample])
    check_tokens(ours.select(list(sample)), [published[i] for i in sample], [scores[i] for i in sample])
    print("per round (s): published " + " ".join(f"{t:.3f}" for t in times["published"]) + "; lean reference "
          + " ".join(f"{t:.3f}" for t in times["ref"]) + "; scforge, gene matching given "
          + " ".join(f"{t:.3f}" for t in times["scforge_rank"]))
    tok_pub, tok_ref = statistics.median(times["published"]), statistics.median(times["ref"])
    tok_ours, tok_rank = statistics.median(times["scforge"]), statistics.median(times["scforge_rank"])
    print(f"tokenize {n_tok} cells (V1), gene matching given to the references: published algorithm "
          f"{n_tok / tok_pub:,.0f} cells/s, lean CSR-slicing variant {n_tok / tok_ref:,.0f} cells/s")
    print(f"  scforge with gene matching given {n_tok / tok_rank:,.0f} cells/s: {tok_pub / tok_rank:.1f}x the published, "
          f"{tok_ref / tok_rank:.1f}x the lean variant")
    print(f"  scforge end to end {n_tok / tok_ours:,.0f} cells/s: {tok_pub / tok_ours:.1f}x the published, "
          f"{tok_ref / tok_ours:.1f}x the lean variant; outputs equal up to tie order")
    tokenize_result = (f"tokenize_speedup={tok_pub / tok_rank:.1f} tokenize_speedup_vs_lean={tok_ref / tok_rank:.1f} "
                       f"tokenize_speedup_end_to_end={tok_pub / tok_ours:.1f}")

    if args.tokenize_only:
        print(f"RESULT geneformer {tokenize_result}")
        return

    # ---- (b) embedding ----
    config = GeneformerConfig.v1_10m(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    hf = transformers.BertForMaskedLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = Geneformer.from_published(tmp)
    bert = hf.bert
    assert bert.config._attn_implementation == "sdpa"
    n_emb = 16 if args.quick else 128
    cells = model.tokenize(adata[n_tok - n_emb: n_tok].copy() if n_tok >= n_emb else adata[:n_emb].copy())
    batch = 32
    order = np.argsort(-cells.lengths, kind="stable")

    def run_hf(hidden, cells=cells, order=order):
        """transformers on length-sorted padded batches; ``hidden(ids, mask)`` gives the states to pool
        (mean over each cell's genes)."""
        out = np.zeros((cells.n_cells, config.hidden_size), dtype=np.float32)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, order.size, batch):
                idx = order[s:s + batch]
                b = cells.pad(idx)
                mask = (~b["padding_mask"]).long()
                h = hidden(b["genes"], mask).float()
                out[idx] = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
        return time.perf_counter() - t0, out

    def backbone(ids, mask):  # BertModel alone: all 6 layers, no MLM head
        return bert(input_ids=ids, attention_mask=mask).last_hidden_state

    def extractor(ids, mask):  # as Geneformer's EmbExtractor: full BertForMaskedLM, penultimate layer
        return hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]

    def run_ours(emb_layer):
        t0 = time.perf_counter()
        out = model.embed_cells(cells, emb_layer=emb_layer, batch_size=batch, precision="fp32", device="cpu")
        return time.perf_counter() - t0, out

    times = {"hf": [], "fp32": [], "fp32_penultimate": [], "hf_extractor": []}
    for _ in range(rounds):
        t, ref_emb = run_hf(backbone)
        times["hf"].append(t)
        t, our_emb = run_ours(0)
        times["fp32"].append(t)
        t, ref_pen = run_hf(extractor)
        times["hf_extractor"].append(t)
        t, our_pen = run_ours(-1)
        times["fp32_penultimate"].append(t)
    diff = float(max(np.abs(ref_emb - our_emb).max(), np.abs(ref_pen - our_pen).max()))
    assert diff < 1e-4, diff

    # bf16, on fewer cells (every k-th by length): this CPU has no native bf16, so both sides are slower than in
    # fp32. transformers runs its bf16 weights (SDPA); scforge runs precision="bf16".
    n_bf16 = 2 if args.quick else 32
    bf_pick = order[:: max(1, order.size // n_bf16)][:n_bf16]
    bf_cells = cells.select(list(bf_pick))
    bf_order = np.argsort(-bf_cells.lengths, kind="stable")
    bert_bf16 = copy.deepcopy(bert).to(torch.bfloat16)

    def backbone_bf16(ids, mask):
        return bert_bf16(input_ids=ids, attention_mask=mask).last_hidden_state

    for _ in range(rounds):
        t, ref_bf16 = run_hf(backbone_bf16, bf_cells, bf_order)
        times.setdefault("hf_bf16", []).append(t)
        t0 = time.perf_counter()
        our_bf16 = model.embed_cells(bf_cells, emb_layer=0, batch_size=batch, precision="bf16", device="cpu")
        times.setdefault("bf16", []).append(time.perf_counter() - t0)

    def cosine(a, b):
        return float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    fp32_ref = ref_emb[bf_pick]
    cos_ours, cos_hf = cosine(our_bf16, fp32_ref), cosine(ref_bf16, fp32_ref)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = cells.n_cells
    print(f"embed {n} cells (lengths {int(cells.lengths.min())}..{int(cells.lengths.max())}, mean "
          f"{cells.lengths.mean():.0f}), V1 shape, fp32, batch {batch}:")
    print(f"  transformers BertModel sdpa padded, sorted: {n / med['hf']:8.1f} cells/s")
    print(f"  scforge packed, all 6 layers:               {n / med['fp32']:8.1f} cells/s ({med['hf'] / med['fp32']:.2f}x), "
          f"max |diff| {diff:.1e}")
    print(f"  scforge packed, emb_layer=-1 (5 layers):     {n / med['fp32_penultimate']:8.1f} cells/s "
          f"({med['hf'] / med['fp32_penultimate']:.2f}x)")
    print(f"  transformers BertForMaskedLM as EmbExtractor runs it (hidden states, penultimate): "
          f"{n / med['hf_extractor']:8.1f} cells/s; scforge emb_layer=-1 is {med['hf_extractor'] / med['fp32_penultimate']:.2f}x")
    nb = bf_cells.n_cells
    print(f"  bf16 ({nb} cells, lengths {int(bf_cells.lengths.min())}..{int(bf_cells.lengths.max())}; no native bf16 on "
          f"this CPU): transformers BertModel bf16 {nb / med['hf_bf16']:.1f} cells/s, scforge bf16 "
          f"{nb / med['bf16']:.1f} cells/s ({med['hf_bf16'] / med['bf16']:.2f}x); lowest cosine to the fp32 "
          f"embedding: scforge {cos_ours:.5f}, transformers {cos_hf:.5f}")
    print(f"RESULT geneformer {tokenize_result} embed_speedup={med['hf'] / med['fp32']:.2f} "
          f"embed_speedup_bf16={med['hf_bf16'] / med['bf16']:.2f} "
          f"embed_speedup_penultimate={med['hf'] / med['fp32_penultimate']:.2f} "
          f"embed_speedup_vs_embextractor={med['hf_extractor'] / med['fp32_penultimate']:.2f} parity_max_abs_diff={diff:.1e}")


if __name__ == "__main__":
    main()
