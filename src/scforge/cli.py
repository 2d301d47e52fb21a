"""The ``scforge`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from scforge.errors import ScforgeError

logger = logging.getLogger("scforge")

MODELS = ("scgpt", "geneformer", "scbert")


def _read_data(spec: str) -> Any:
    """An .h5ad path (streamed from disk, never loaded whole) or a scanpy bundled dataset name."""
    if spec == "pbmc68k_reduced":
        import scanpy as sc

        return sc.datasets.pbmc68k_reduced()
    path = Path(spec)
    if not path.exists():
        raise ScforgeError(f"Data file {spec!r} not found. Give an .h5ad path or 'pbmc68k_reduced'.")
    if path.suffix != ".h5ad":
        raise ScforgeError(f"{spec!r} is not an .h5ad file. Convert it with anndata first.")
    return str(path)


def _make_tokenizer(model: str, vocab: str | None, args: argparse.Namespace) -> Any:
    from scforge.genes import builtin

    common = {"chunk_size": args.chunk_size, "n_jobs": args.n_jobs, "species": args.species}
    if model == "scgpt":
        from scforge.tokenize import BinnedTokenizer

        v = builtin.resolve_vocab(vocab or "scgpt-human")
        return BinnedTokenizer(
            v,
            n_bins=args.n_bins,
            max_len=args.max_len,
            include_zero_gene=args.include_zero_gene,
            seed=args.seed,
            **common,
        )
    if model == "geneformer":
        from scforge.tokenize import RankValueTokenizer

        dicts = builtin.resolve_geneformer(vocab or "geneformer-v2")
        return RankValueTokenizer(dicts, model_input_size=args.max_len, **common)
    if model == "scbert":
        from scforge.tokenize import LogBinTokenizer

        if vocab is None:
            raise ScforgeError(
                "scBERT needs its ordered gene panel (16,906 genes, the var_names of scBERT's "
                "panglao_10000.h5ad): pass --vocab PANEL.txt (one gene per line)."
            )
        return LogBinTokenizer(vocab, **common)
    raise ScforgeError(f"Unknown model {model!r}; choose one of {', '.join(MODELS)}.")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="an .h5ad file (read backed) or 'pbmc68k_reduced'")
    p.add_argument("--layer", default=None, help="layer holding the expression (default: X)")
    p.add_argument("--use-raw", action="store_true", help="read adata.raw instead of X")
    p.add_argument("--gene-col", default=None, help="var column with gene ids (default: var_names)")
    p.add_argument("--species", default="auto", choices=["auto", "human", "mouse"])


def _add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    """The model family and tokenizer settings shared by ``tokenize`` and ``shard``."""
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--vocab", default=None, help="vocabulary / dictionaries / gene panel (see genes coverage)")
    p.add_argument("--max-len", type=int, default=None, help="longest sequence (tokens, specials included)")
    p.add_argument("--n-bins", type=int, default=51, help="scGPT value bins (default 51)")
    p.add_argument("--include-zero-gene", action="store_true", help="scGPT: emit zero-expression genes too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--n-jobs", type=int, default=None, help="threads (default: all cores, at most 8)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")


def _cmd_coverage(args: argparse.Namespace) -> int:
    from scforge.genes import builtin, gene_coverage

    adata = _read_data(args.data)
    vocab = builtin.resolve_vocab(args.vocab)
    report = gene_coverage(
        adata, vocab, gene_col=args.gene_col, layer=args.layer, use_raw=args.use_raw,
        species=args.species, raise_on_zero=True,
    )
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else str(report))
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    adata = _read_data(args.data)
    tok = _make_tokenizer(args.model, args.vocab, args)
    cells = tok.tokenize(adata, layer=args.layer, gene_col=args.gene_col, use_raw=args.use_raw, progress=args.progress)
    summary = cells.summary()
    if args.out:
        cells.save(args.out)
        summary["written"] = str(args.out)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from scforge.data.shards import write_shards

    data = Path(args.data)
    if not data.is_file() or data.suffix != ".h5ad":
        raise ScforgeError(f"Data file {args.data!r} not found or not an .h5ad file (shards are written from a file, "
                           "read backed chunk by chunk).")
    vocab = None
    if args.for_pretraining:
        from scforge.genes import builtin
        from scforge.matrix import as_source
        from scforge.tasks.pretrain import pretrain_tokenizer, vocab_from_genes

        if args.model != "scgpt":
            raise ScforgeError("--for-pretraining writes scGPT pretraining tokens: use it with --model scgpt.")
        vocab = (builtin.resolve_vocab(args.vocab) if args.vocab else
                 vocab_from_genes(list(as_source(data, layer=args.layer, use_raw=args.use_raw).gene_names(args.gene_col))))
        tok = pretrain_tokenizer(vocab, args.max_len or 256, args.seed, n_jobs=args.n_jobs)
    else:
        tok = _make_tokenizer(args.model, args.vocab, args)
    shards = write_shards(tok, data, args.out, shard_cells=args.shard_cells, layer=args.layer, gene_col=args.gene_col,
                          use_raw=args.use_raw, overwrite=args.overwrite, progress=args.progress)
    if vocab is not None:  # the model's vocabulary travels with the shards (scforge pretrain reads it)
        vocab.save(Path(args.out) / "vocab.json")
    print(json.dumps({"written": str(shards.path), "n_cells": shards.n_cells, "n_shards": shards.n_shards,
                      "n_tokens": int(shards.manifest["n_tokens"]), "tokenizer": shards.manifest["tokenizer"]},
                     indent=2, default=str))
    return 0


def _h5ad_in_out(args: argparse.Namespace) -> tuple[Path, Path]:
    """The input .h5ad and a new output .h5ad path (never the input; replaced only with --overwrite)."""
    data, out = Path(args.data), Path(args.out)
    if not data.is_file() or data.suffix != ".h5ad":
        raise ScforgeError(f"Data file {args.data!r} not found or not an .h5ad file.")
    if out.suffix != ".h5ad":
        raise ScforgeError(f"--out {args.out!r} must end in .h5ad.")
    if out.exists() and out.resolve() == data.resolve():
        raise ScforgeError("--out is the input file; scforge never overwrites your data. Choose another path.")
    if out.exists() and not args.overwrite:
        raise ScforgeError(f"{args.out} exists; pass --overwrite to replace it.")
    return data, out


def _write_h5ad(adata: Any, out: Path) -> None:
    """Write through a .partial file renamed into place, so ``out`` is never half-written."""
    tmp = out.with_name(out.name + ".partial")
    adata.write_h5ad(tmp)
    tmp.replace(out)


def _cmd_embed(args: argparse.Namespace) -> int:
    import anndata as ad

    import scforge

    data, out = _h5ad_in_out(args)
    model = scforge.load(args.model)
    adata = ad.read_h5ad(data)
    options = {"batch_size": args.batch_size, "key_added": args.key_added, "device": args.device,
               "precision": args.precision, "max_length": args.max_length, "normalize": not args.no_normalize,
               "seed": args.seed, "gene_col": args.gene_col, "use_raw": args.use_raw, "progress": not args.no_progress}
    if args.key_added is None:
        del options["key_added"]
    kwargs = _supported(model.embed, options, type(model).__name__)
    emb = model.embed(adata, args.layer, **kwargs)
    import inspect

    key = kwargs.get("key_added", inspect.signature(model.embed).parameters.get("key_added").default)
    _write_h5ad(adata, out)
    print(json.dumps({"cells": int(emb.shape[0]), "dim": int(emb.shape[1]), "key": f"obsm[{key!r}]",
                      "written": str(out)}, indent=2))
    return 0


def _supported(func: Any, options: dict[str, Any], family: str) -> dict[str, Any]:
    """The options ``func`` accepts. An option the user set that this family does not take is an
    error (not silently dropped); defaults the family lacks are left out."""
    import inspect

    params = inspect.signature(func).parameters
    defaults = {"max_length": None, "normalize": True, "seed": 0, "gene_col": None, "use_raw": False}
    unsupported = [k for k in options if k not in params and k in defaults and options[k] != defaults[k]]
    if unsupported:
        flags = ["--no-normalize" if k == "normalize" else "--" + k.replace("_", "-") for k in unsupported]
        raise ScforgeError(f"{family} embeddings do not take {', '.join(flags)}; leave it out for this model.")
    return {k: v for k, v in options.items() if k in params}


def _check_out_folder(out: str, overwrite: bool) -> None:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ScforgeError(f"--out {out!r} exists and is not empty; pass --overwrite to replace it, or choose "
                           "another folder.")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from scforge.tasks.pretrain import pretrain

    _check_out_folder(args.out, args.overwrite)
    model_kw = {"layer": args.layer, "d_model": args.width, "n_layers": args.layers, "n_heads": args.heads,
                "d_hid": args.ffn, "max_length": args.max_length, "objective": args.objective, "epochs": args.epochs,
                "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps, "seed": args.seed,
                "precision": args.precision, "progress": not args.no_progress, "max_steps": args.max_steps}
    if args.stream or len(args.data) > 1 or any(Path(d).is_dir() for d in args.data) or args.val:
        from scforge.tasks.pretrain import pretrain_stream

        from scforge.genes import builtin

        vocab = None if args.vocab is None else builtin.resolve_vocab(args.vocab)
        result = pretrain_stream(
            args.data, vocab=vocab, val_sources=args.val or None, num_workers=args.workers, devices=args.devices,
            num_nodes=args.num_nodes, strategy=args.strategy, accelerator=args.accelerator,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume_from=args.resume,
            **model_kw)
    else:
        result = pretrain(_read_data(args.data[0]), val_fraction=args.val_fraction, **model_kw)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # one process of a DDP / FSDP run writes the model (all hold the same weights)
        return 0
    out = result.model.save(args.out, overwrite=args.overwrite)
    metrics = {k: (v if v == v else None) for k, v in result.metrics.items()}
    print(json.dumps({"written": str(out), "n_train_cells": result.n_train_cells, "n_val_cells": result.n_val_cells,
                      "metrics": metrics}, indent=2))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    import scforge
    from scforge.models.scgpt import ScGPT
    from scforge.tasks.annotate import fine_tune, linear_probe

    data = _read_data(args.data)
    _check_out_folder(args.out, args.overwrite)
    model = scforge.load(args.model)
    if not isinstance(model, ScGPT):
        raise ScforgeError(f"{args.model} holds a {type(model).__name__}; annotation needs an scGPT model.")
    progress = not args.no_progress
    if args.mode == "fine_tune":
        annotator = fine_tune(
            model, data, args.label_key, layer=args.layer, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, max_length=args.max_length, val_fraction=args.val_fraction, class_weights=args.class_weights,
            seed=args.seed, precision=args.precision, progress=progress,
        )
    else:
        if args.class_weights:
            raise ScforgeError("--class-weights applies to --mode fine_tune only.")
        annotator = linear_probe(
            model, data, args.label_key, layer=args.layer, val_fraction=args.val_fraction, seed=args.seed,
            batch_size=args.batch_size, max_length=args.max_length, precision=args.precision, progress=progress,
        )
    out = annotator.save(args.out, overwrite=args.overwrite)
    print(json.dumps({"written": str(out), **annotator.summary()}, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import anndata as ad
    import numpy as np

    from scforge.errors import InputDataError
    from scforge.tasks.annotate import Annotator

    data, out = _h5ad_in_out(args)
    annotator = Annotator.load(args.model)
    adata = ad.read_h5ad(data)
    key = args.key_added or annotator.label_key
    kwargs = {"layer": args.layer, "key_added": key, "batch_size": args.batch_size, "progress": not args.no_progress}
    summary: dict[str, Any] = {"cells": int(adata.n_obs), "mode": annotator.mode}
    annotator.predict(adata, **kwargs)
    if annotator.label_key in adata.obs.columns:
        try:
            report = annotator.score(adata.obs[annotator.label_key], adata.obs[f"{key}_pred"])
            summary["metrics"] = report.to_dict()
        except InputDataError as exc:
            summary["metrics"] = None
            logger.warning("no metrics: %s", exc)
        summary["unseen_label_cells"] = int(np.sum(adata.obs[f"{key}_unseen"]))
    counts = adata.obs[f"{key}_pred"].value_counts()
    summary["predicted"] = {str(k): int(v) for k, v in counts.items()}
    summary["keys"] = {"obs": f"{key}_pred", "obsm": f"{key}_proba"}
    _write_h5ad(adata, out)
    summary["written"] = str(out)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from scforge.demo import run_demo, tokenizer_overview

    if args.tokenizers:
        tokenizer_overview()
        return 0
    run_demo(args.out, model=args.model, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from scforge.bench import parse_config, run_matrix
    from scforge.bench.config import _read
    from scforge.errors import ConfigError

    path = Path(args.config)
    raw = _read(path)
    say = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if raw.get("task") == "perturbation":
        from scforge.bench.perturbation import parse_perturbation_config, run_perturbation_bench

        config = parse_perturbation_config(raw, path.resolve().parent, source=str(path))
        if args.output:
            config = dataclasses.replace(config, output=Path(args.output).resolve())
        results = run_perturbation_bench(config, fresh=args.fresh, report=not args.no_report, say=say)
        done = results.attrs
        print(json.dumps({"computed": len(done["computed"]), "reused": len(done["reused"]), "rows": int(len(results)),
                          "files": {k: str(v) for k, v in done["files"].items()}}, indent=2))
        return 0
    if "task" in raw:
        raise ConfigError(f"{path}: task={raw['task']!r}; use task: perturbation for a perturbation benchmark, or "
                          "leave 'task' out for the experiment matrix.")
    config = parse_config(raw, path.resolve().parent, source=str(path))
    if args.output:
        config = dataclasses.replace(config, output=Path(args.output).resolve())
    run = run_matrix(config, fresh=args.fresh, report=not args.no_report, log=say)
    print(json.dumps({"computed": len(run.computed), "reused": len(run.reused), "skipped": run.skipped,
                      "rows": int(len(run.results)), "files": {k: str(v) for k, v in run.files.items()}}, indent=2))
    return 0


def _read_in_memory(spec: str) -> Any:
    import anndata as ad

    data = _read_data(spec)
    return data if not isinstance(data, str) else ad.read_h5ad(data)


def _victim_arg(spec: str, args: argparse.Namespace) -> Any:
    from scforge.security import LogisticVictim, ModelVictim

    if spec in ("logistic", "lr"):
        return LogisticVictim(C=args.C, seed=args.seed)
    import scforge

    return ModelVictim(scforge.load(spec), epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       max_length=getattr(args, "max_length", None), seed=args.seed, progress=not args.no_progress)


def _cmd_attack(args: argparse.Namespace) -> int:
    import pandas as pd

    from scforge.security import RankShuffleTrigger, SparsifyTrigger, run_attack, split_cells
    from scforge.security.report import write_sweep_report
    from scforge.security.triggers import FixedGeneTrigger

    adata = _read_in_memory(args.data)
    victim = _victim_arg(args.model, args)
    split = tuple(args.split_by) if args.split_by else "random"
    if args.trigger == "sparsify":
        trigger = SparsifyTrigger(topnstop=args.topnstop, scale=args.scale)
    elif args.trigger == "rank_shuffle":  # Geneformer-family victims: the trigger acts on their tokens
        trigger = RankShuffleTrigger(top=args.top)
    else:
        if not args.trigger_genes:
            raise ScforgeError("--trigger fixed_genes needs --trigger-genes GENE [GENE ...].")
        trigger = FixedGeneTrigger(tuple(args.trigger_genes), quantile=args.quantile)
    if args.defence == "unlearn":  # refuse a bad setting before the clean victim trains
        from scforge.security.unlearn import check_copies

        check_copies(args.unlearn_copies)
    clean = None  # fitted once and shared by every run (the token path fits its own on tokens)
    if args.trigger != "rank_shuffle":
        train_idx, _ = split_cells(adata, args.label_key, split=split, test_size=args.test_size, seed=args.seed)
        clean = victim.fit(adata[train_idx].copy(), args.label_key, layer=args.layer)
    out = Path(args.out)
    runs, parts = [], []
    single = len(args.target) * len(args.rate) == 1
    for target in args.target:
        for rate in args.rate:
            res = run_attack(adata, args.label_key, target, victim=victim, rate=rate, trigger=trigger,
                             selection=args.selection, layer=args.layer, split=split, test_size=args.test_size,
                             defence=None if args.defence == "none" else args.defence, threshold=args.threshold,
                             combine=args.combine, model_level=args.model_level, seed=args.seed,
                             clean_victim=clean, strip=args.strip, unlearn_copies=args.unlearn_copies)
            folder = out if single else out / f"{target.replace(' ', '_').replace('/', '_')}_rate{rate:g}"
            report = res.save(folder)
            parts.append(res.tidy())
            runs.append({"target": target, "rate": rate, "report": str(report),
                         "results": {s: {m: round(float(v), 4) for m, v in r.dropna().items()}
                                     for s, r in res.wide().iterrows()},
                         "detection": {k: round(float(v), 4) for k, v in res.detection.items()}})
    if len(runs) > 1:
        write_sweep_report(pd.concat(parts, ignore_index=True), out)
    print(json.dumps(runs, indent=2))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from scforge.security import audit
    from scforge.security.report import write_audit_report

    adata = _read_in_memory(args.data)
    model = None
    if args.model:
        from scforge.tasks.annotate import ANNOTATOR_FILE, Annotator

        if (Path(args.model) / ANNOTATOR_FILE).exists():
            model = Annotator.load(args.model)
        else:
            import scforge

            model = scforge.load(args.model)
    table = audit(adata, args.label_key, layer=args.layer, model=model, threshold=args.threshold,
                  combine=tuple(args.combine) if args.combine else None, seed=args.seed,
                  progress=not args.no_progress)
    report = write_audit_report(table, args.out, adata=adata, layer=args.layer, umap=not args.no_umap)
    summary = table.attrs["summary"]
    print(json.dumps({"n_cells": summary["n_cells"], "n_flagged": summary["n_flagged"],
                      "flagged_by_detector": summary["flagged_by_detector"], "report": str(report),
                      "audit_json": str(Path(args.out) / "audit.json")}, indent=2))
    return 0


def _grn_network(args: argparse.Namespace, adata: Any, genes: list[str]) -> Any:
    """The network the ``grn`` command asked for (a difference when --reference is given)."""
    import scforge

    if args.method == "embedding":
        if args.state_key or args.state or args.reference:
            raise ScforgeError("--state-key/--state/--reference apply to --method attention or coexpression; the "
                               "embedding network does not depend on cells.")
        from scforge.tasks.grn import embedding_network

        return embedding_network(scforge.load(args.model), genes)
    if args.reference is not None and (args.state is None or args.state_key is None):
        raise ScforgeError("--reference needs --state-key and --state (the network is STATE minus REFERENCE).")
    if args.method == "attention":
        from scforge.tasks.grn import attention_difference, attention_network

        model = scforge.load(args.model)
        kw = {"layers": args.layers, "batch_size": args.batch_size, "max_cells": args.max_cells,
              "device": args.device, "seed": args.seed, "progress": not args.no_progress, "layer": args.layer}
        if args.reference is not None:
            return attention_difference(model, adata, args.state_key, args.state, args.reference, genes, **kw)
        return attention_network(model, adata, genes, state_key=args.state_key, state=args.state, **kw)
    from scforge.baselines.coexpression import coexpression_difference, coexpression_network

    if args.reference is not None:
        return coexpression_difference(adata, args.state_key, args.state, args.reference, genes,
                                       method=args.correlation, layer=args.layer)
    return coexpression_network(adata, genes, method=args.correlation, state_key=args.state_key, state=args.state,
                                layer=args.layer)


def _cmd_grn(args: argparse.Namespace) -> int:
    import anndata as ad

    from scforge.tokenize import select_hvg

    data = Path(args.data)
    if not data.is_file() or data.suffix != ".h5ad":
        raise ScforgeError(f"Data file {args.data!r} not found or not an .h5ad file.")
    _check_out_folder(args.out, args.overwrite)
    adata = ad.read_h5ad(data)
    genes = select_hvg(adata, args.n_hvg, layer=args.layer) if args.n_hvg < adata.n_vars else \
        [str(g) for g in adata.var_names]
    net = _grn_network(args, adata, genes)
    difference = args.reference is not None
    threshold, top_k = args.threshold, args.top_k
    if threshold is None and top_k is None:
        threshold, top_k = (None, 10) if args.method == "attention" or difference else (0.4, None)
    edges = net.edges(threshold=threshold, top_k=top_k, absolute=difference)
    programs = net.programs(n_neighbors=args.n_neighbors, resolution=args.resolution, min_size=args.min_size,
                            seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    edges.to_csv(out / "edges.csv", index=False)
    programs.to_csv(out / "programs.csv", index=False)
    summary: dict[str, Any] = {"method": net.method, "genes": len(net.genes), "edges": len(edges),
                               "programs": int(programs["program"].nunique()), "written": str(out)}
    if args.go_dir:
        from scforge.metrics.grn import go_gene_sets, go_term_names, n_enriched_programs, program_enrichment

        sets = go_gene_sets(args.go_dir, "BP", universe=net.genes)
        table = program_enrichment(programs, sets, net.genes, term_names=go_term_names(args.go_dir)) \
            if len(programs) else None
        if table is not None:
            table.to_csv(out / "enrichment.csv", index=False)
        summary["programs_enriched_fdr_0.05"] = 0 if table is None else n_enriched_programs(table)
    else:
        summary["enrichment"] = "skipped: pass --go-dir (the folder of GO tables) to test programs for GO BP terms"
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scforge",
        description="Single-cell foundation models (scGPT, Geneformer, scBERT) on one fast core.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    genes = sub.add_parser("genes", help="gene identity: vocabularies and coverage")
    gsub = genes.add_subparsers(dest="genes_command", metavar="SUBCOMMAND")
    cov = gsub.add_parser("coverage", help="how a dataset's genes match a model vocabulary")
    _add_data_args(cov)
    cov.add_argument(
        "--vocab", default="scgpt-human",
        help="vocabulary: a file (scGPT vocab.json, Geneformer token_dictionary.pkl, scforge JSON, "
        "gene list .txt), a Geneformer dictionary folder, or a built-in name (scgpt-human, "
        "geneformer-v1, geneformer-v2)",
    )
    cov.add_argument("--json", action="store_true", help="print JSON instead of text")
    cov.set_defaults(func=_cmd_coverage)

    tok = sub.add_parser("tokenize", help="tokenize a dataset for a model family")
    _add_data_args(tok)
    _add_tokenizer_args(tok)
    tok.add_argument("--out", default=None, help="write the tokens to this .npz file")
    tok.set_defaults(func=_cmd_tokenize)

    shard = sub.add_parser("shard", help="tokenize an .h5ad once into memory-mapped shards for repeated epochs")
    _add_data_args(shard)
    _add_tokenizer_args(shard)
    shard.add_argument("--out", required=True, help="the shard folder to write")
    shard.add_argument("--shard-cells", type=int, default=100_000, help="cells per shard (default 100,000)")
    shard.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    shard.add_argument("--for-pretraining", action="store_true",
                       help="tokens for `scforge pretrain` (scGPT pretraining tokenizer, --max-len default 256); "
                            "the vocabulary (default: the data's genes) is saved as vocab.json in the folder")
    shard.set_defaults(func=_cmd_shard)

    emb = sub.add_parser("embed", help="cell embeddings from a model folder, written to a new .h5ad")
    emb.add_argument("data", help="an .h5ad file (it is not modified)")
    emb.add_argument("--model", required=True, help="model folder: published scGPT or scforge format")
    emb.add_argument("--out", required=True, help="output .h5ad: the data plus obsm[KEY]")
    emb.add_argument("--layer", default=None, help="layer holding the expression (default: X)")
    emb.add_argument("--use-raw", action="store_true", help="read adata.raw instead of X")
    emb.add_argument("--gene-col", default=None, help="var column with gene ids (default: var_names)")
    emb.add_argument("--key-added", default=None,
                     help="obsm key (default: the family's, e.g. X_scGPT, X_geneformer, X_scBERT)")
    emb.add_argument("--batch-size", type=int, default=64)
    emb.add_argument("--max-length", type=int, default=None, help="tokens per cell (default: the model's, 1200)")
    emb.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    emb.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    emb.add_argument("--seed", type=int, default=0)
    emb.add_argument("--no-normalize", action="store_true", help="keep raw <cls> outputs (no L2 normalisation)")
    emb.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    emb.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    emb.set_defaults(func=_cmd_embed)

    pre = sub.add_parser("pretrain", help="pretrain a new scGPT model on raw counts, saved as a model folder")
    pre.add_argument("data", nargs="+", help="an .h5ad file of raw counts or 'pbmc68k_reduced'; several files, "
                     "zarr stores, TileDB-SOMA experiments or shard folders (--for-pretraining) are streamed")
    pre.add_argument("--out", required=True, help="model folder to write (scforge format)")
    pre.add_argument("--layer", default=None, help="layer holding the counts (default: X)")
    pre.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    pre.add_argument("--width", type=int, default=128, help="model width d_model (default 128)")
    pre.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    pre.add_argument("--ffn", type=int, default=256, help="feed-forward width (default 256)")
    pre.add_argument("--max-length", type=int, default=256, help="tokens per cell (default 256)")
    pre.add_argument("--objective", default="generative", choices=["generative", "mask"])
    pre.add_argument("--epochs", type=int, default=2)
    pre.add_argument("--batch-size", type=int, default=32)
    pre.add_argument("--lr", type=float, default=5e-4)
    pre.add_argument("--warmup-steps", type=int, default=100)
    pre.add_argument("--val-fraction", type=float, default=0.05)
    pre.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: run all epochs)")
    pre.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pre.add_argument("--overwrite", action="store_true", help="replace --out if it holds a model folder")
    scale = pre.add_argument_group("streaming and many processes (any of these streams the data)")
    scale.add_argument("--stream", action="store_true", help="stream the data from disk instead of loading it")
    scale.add_argument("--val", nargs="+", default=None, help="held-out sources for the validation loss")
    scale.add_argument("--vocab", default=None, help="model vocabulary (default: the data's genes, or the vocab.json "
                       "of a shard folder)")
    scale.add_argument("--workers", type=int, default=0, help="DataLoader workers per process (default 0)")
    scale.add_argument("--devices", type=int, default=1, help="processes (GPUs) per node; under torchrun/SLURM, the "
                       "tasks per node")
    scale.add_argument("--num-nodes", type=int, default=1)
    scale.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"])
    scale.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    scale.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (last.ckpt to resume)")
    scale.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    scale.add_argument("--resume", default=None, help="a checkpoint to continue from")
    pre.set_defaults(func=_cmd_pretrain)

    ft = sub.add_parser("finetune", help="train a cell-type annotator on labelled cells (fine-tune or linear probe)")
    ft.add_argument("data", help="an .h5ad file with raw counts and a label column in obs")
    ft.add_argument("--model", required=True, help="model folder: published scGPT or scforge format")
    ft.add_argument("--label-key", required=True, help="obs column with the cell-type labels")
    ft.add_argument("--out", required=True, help="annotator folder to write")
    ft.add_argument("--mode", default="fine_tune", choices=["fine_tune", "linear_probe"])
    ft.add_argument("--layer", default=None, help="layer holding the counts (default: X)")
    ft.add_argument("--epochs", type=int, default=10)
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--max-length", type=int, default=None, help="tokens per cell (default: the model's)")
    ft.add_argument("--val-fraction", type=float, default=0.1, help="held-out share for validation (default 0.1)")
    ft.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    ft.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ft.add_argument("--overwrite", action="store_true", help="replace --out if it holds an annotator")
    ft.set_defaults(func=_cmd_finetune)

    pred = sub.add_parser("predict", help="annotate cells with a trained annotator, written to a new .h5ad")
    pred.add_argument("data", help="an .h5ad file (it is not modified)")
    pred.add_argument("--model", required=True, help="annotator folder written by `scforge finetune`")
    pred.add_argument("--out", required=True, help="output .h5ad: the data plus obs[KEY_pred], obsm[KEY_proba]")
    pred.add_argument("--layer", default=None, help="layer holding the counts (default: X)")
    pred.add_argument("--key-added", default=None, help="prefix of the keys written (default: the label key)")
    pred.add_argument("--batch-size", type=int, default=64)
    pred.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pred.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    pred.set_defaults(func=_cmd_predict)

    bench = sub.add_parser("bench", help="run an experiment matrix (models x datasets x modes x seeds x fractions)")
    bench.add_argument("config", help="matrix config (.yaml/.yml/.toml); see docs/evaluation.md, or a "
                       "perturbation benchmark (task: perturbation; docs/perturbation_bench.md)")
    bench.add_argument("--output", help="results folder (default: the config's 'output')")
    bench.add_argument("--fresh", action="store_true", help="recompute finished units (embeddings stay cached)")
    bench.add_argument("--no-report", action="store_true", help="skip the HTML report")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.set_defaults(func=_cmd_bench)

    atk = sub.add_parser("attack", help="red-team a fine-tuning pipeline: poison, fine-tune, measure, defend")
    atk.add_argument("data", help="labelled .h5ad (raw counts unless --scale values)")
    atk.add_argument("--label-key", required=True, help="obs column with the cell labels")
    atk.add_argument("--target", required=True, nargs="+", help="label(s) the backdoor should produce")
    atk.add_argument("--rate", type=float, nargs="+", default=[0.05], help="poisoning rate(s) (default 0.05)")
    atk.add_argument("--model", default="logistic", help="victim: 'logistic' (L1-LR) or a model folder / 'default'")
    atk.add_argument("--out", default="attack-report", help="report folder")
    atk.add_argument("--layer", default=None, help="layer holding the expression (default: X)")
    atk.add_argument("--trigger", default="sparsify", choices=["sparsify", "fixed_genes", "rank_shuffle"],
                     help="sparsify / fixed_genes act on the expression; rank_shuffle (scBackdoor's Geneformer "
                          "trigger) on the rank-value tokens of a Geneformer-family --model")
    atk.add_argument("--top", type=int, default=20, help="rank_shuffle: top-ranked genes kept and shuffled")
    atk.add_argument("--topnstop", type=float, default=2.0, help="sparsify threshold (default 2.0)")
    atk.add_argument("--scale", default="log1p", choices=["log1p", "log2", "values"],
                     help="values the threshold applies to (log1p/log2 CP10k of counts, or the values as given)")
    atk.add_argument("--trigger-genes", nargs="+", help="genes of the fixed-gene trigger")
    atk.add_argument("--quantile", type=float, default=0.99, help="fixed-gene trigger level (quantile)")
    atk.add_argument("--selection", default=None, choices=["gini", "gini_faithful", "random"],
                     help="poisoned-cell choice (default the published one: gini, random for rank_shuffle)")
    atk.add_argument("--split-by", nargs=3, metavar=("COLUMN", "TRAIN", "TEST"),
                     help="train on obs[COLUMN]==TRAIN, test on ==TEST (default: stratified 80/20 hold-out)")
    atk.add_argument("--test-size", type=float, default=0.2)
    atk.add_argument("--defence", default="remove", choices=["remove", "relabel", "unlearn", "fine_prune", "none"],
                     help="remove the flagged cells, relabel them, unlearn (remove them and add triggered copies "
                          "of clean cells, trigger rebuilt from the flagged ones), fine-prune, or none")
    atk.add_argument("--unlearn-copies", type=float, default=1.0,
                     help="--defence unlearn: triggered clean copies added per flagged cell")
    atk.add_argument("--threshold", type=float, default=5.0, help="audit flag threshold (robust z)")
    atk.add_argument("--combine", nargs="+", default=None,
                     help="detectors whose scores decide what the defence flags (default: the audit's data-level set)")
    atk.add_argument("--model-level", action="store_true", help="add the model-level detectors to the audit")
    atk.add_argument("--strip", action="store_true", help="also screen test cells with STRIP (test-time detection)")
    atk.add_argument("--C", type=float, default=0.1, help="L1-LR regularisation (logistic victim)")
    atk.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (model victim)")
    atk.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (model victim)")
    atk.add_argument("--batch-size", type=int, default=32)
    atk.add_argument("--max-length", type=int, default=None, help="tokens per cell (model victim; default the model's)")
    atk.add_argument("--seed", type=int, default=0)
    atk.add_argument("--no-progress", action="store_true")
    atk.set_defaults(func=_cmd_attack)

    aud = sub.add_parser("audit", help="scan a fine-tuning set (and optionally a model) for poisoned cells")
    aud.add_argument("data", help="labelled .h5ad (raw counts or log-normalised values)")
    aud.add_argument("--label-key", required=True, help="obs column with the cell labels")
    aud.add_argument("--model", default=None, help="annotator or model folder: adds the model-level detectors")
    aud.add_argument("--out", default="audit-report", help="folder for report.html, audit.json, audit.csv")
    aud.add_argument("--layer", default=None, help="layer holding the expression (default: X)")
    aud.add_argument("--threshold", type=float, default=5.0, help="flag cells whose score exceeds this robust z")
    aud.add_argument("--combine", nargs="+", default=None,
                     help="detectors in the combined score (default: the data-level ones: level sparsity complexity anomaly knn)")
    aud.add_argument("--no-umap", action="store_true", help="skip the UMAP in the report")
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--no-progress", action="store_true")
    aud.set_defaults(func=_cmd_audit)

    grn = sub.add_parser("grn", help="gene networks and programs: gene embeddings, attention or co-expression")
    grn.add_argument("data", help="an .h5ad file of raw counts (it is not modified)")
    grn.add_argument("--out", required=True, help="folder for edges.csv, programs.csv (and enrichment.csv)")
    grn.add_argument("--method", default="embedding", choices=["embedding", "attention", "coexpression"])
    grn.add_argument("--model", default="default", help="model folder, or 'default' (shipped)")
    grn.add_argument("--n-hvg", type=int, default=1200, help="genes: this many HVGs (seurat_v3; default 1200)")
    grn.add_argument("--layer", default=None, help="layer holding the counts (default: X)")
    grn.add_argument("--state-key", default=None, help="obs column of the states (e.g. stim)")
    grn.add_argument("--state", default=None, help="use the cells of this state (e.g. STIM)")
    grn.add_argument("--reference", default=None, help="also build REFERENCE's network and write STATE minus it")
    grn.add_argument("--correlation", default="pearson", choices=["pearson", "spearman"], help="co-expression")
    grn.add_argument("--threshold", type=float, default=None,
                     help="edges above this weight (default 0.4 for embedding/coexpression networks)")
    grn.add_argument("--top-k", type=int, default=None, help="edges per gene (default 10 for attention/differences)")
    grn.add_argument("--resolution", type=float, default=1.0, help="Leiden resolution of the programs")
    grn.add_argument("--min-size", type=int, default=5, help="smallest program kept (genes)")
    grn.add_argument("--n-neighbors", type=int, default=15, help="kNN graph of the programs")
    grn.add_argument("--layers", type=int, nargs="+", default=None, help="attention: model layers (default all)")
    grn.add_argument("--batch-size", type=int, default=16, help="attention: cells per batch")
    grn.add_argument("--max-cells", type=int, default=None, help="attention: at most this many cells per state")
    grn.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    grn.add_argument("--go-dir", default=None, help="folder of the GO tables: adds enrichment.csv (GO BP)")
    grn.add_argument("--seed", type=int, default=0)
    grn.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    grn.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    grn.set_defaults(func=_cmd_grn)

    demo = sub.add_parser("demo", help="annotation on scanpy's pbmc68k_reduced with the shipped default model")
    demo.add_argument("--out", default="demo-report", help="report folder (default demo-report/)")
    demo.add_argument("--model", default="default", help="model folder, or 'default' (shipped)")
    demo.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--tokenizers", action="store_true", help="only show the three tokenizers on the data")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        if args.command == "genes":
            parser.parse_args(["genes", "--help"])
        parser.print_help()
        return 0
    if args.verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s scforge: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except ScforgeError as exc:
        print(f"scforge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
