"""Data for scforge tasks: perturbation experiments (GEARS layout and any h5ad) and their profiles."""

from scforge.data.profiles import Group, PerturbationProfiles
from scforge.data.perturbation import (
    PerturbationData,
    PerturbationSplit,
    condition_genes,
    from_anndata,
    heldout_split,
    pair_controls,
    rank_de_genes,
    read_gears,
    simulation_split,
    top_de_genes,
)

__all__ = ["Group", "PerturbationProfiles"]
__all__ += ["PerturbationData", "PerturbationSplit", "condition_genes", "from_anndata", "heldout_split",
            "pair_controls", "rank_de_genes", "read_gears", "simulation_split", "top_de_genes"]
