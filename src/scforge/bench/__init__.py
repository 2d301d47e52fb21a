"""The experiment matrix: models x datasets x modes x seeds x fractions against simple baselines, one
tidy results table and an HTML report (``scforge bench config.yaml``)."""

from scforge.bench.config import MatrixConfig, load_config, parse_config
from scforge.bench.report import summarize, write_report
from scforge.bench.runner import MatrixRun, embed_cells, run_matrix
from scforge.bench.splits import Split, few_shot_splits, holdout_split, subsample

__all__ = ["MatrixConfig", "MatrixRun", "Split", "embed_cells", "few_shot_splits", "holdout_split", "load_config",
           "parse_config", "run_matrix", "subsample", "summarize", "write_report"]
