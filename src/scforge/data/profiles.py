"""Pseudobulk profiles of a perturbation experiment: the common currency of models, baselines and metrics.

A *group* is a ``(condition, context)`` pair: ``condition`` names the perturbation (``"A+ctrl"``,
``"A+B"``, ``"STIM"``) and ``context`` the cell population it was applied to (a cell type or cell
line; ``None`` when the experiment has one). Each group has a mean expression profile; each context
has a control mean. Methods see the profiles of their training groups only, plus every control mean
(controls are inputs, never targets).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from scforge.errors import ConfigError

Group = tuple[str, "str | None"]


@dataclass
class PerturbationProfiles:
    """Mean expression per perturbed group and per context's control cells.

    ``means[(condition, context)]`` and ``control[context]`` are float64 vectors over ``gene_names``;
    ``genes[condition]`` is the tuple of perturbed genes (empty for a stimulus with no gene).
    ``n_cells`` counts the cells behind each mean (groups and ``("ctrl", context)``)."""

    gene_names: np.ndarray
    means: dict[Group, np.ndarray]
    control: dict[str | None, np.ndarray]
    genes: dict[str, tuple[str, ...]]
    n_cells: dict[Group, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gene_names = np.asarray(self.gene_names).astype(str)
        n = self.gene_names.size
        for key, vec in [*self.means.items(), *self.control.items()]:
            if np.shape(vec) != (n,):
                raise ConfigError(f"profile {key!r} has shape {np.shape(vec)}; expected ({n},) to match gene_names")

    @property
    def groups(self) -> list[Group]:
        return list(self.means)

    @property
    def contexts(self) -> list[str | None]:
        return list(self.control)

    def control_mean(self, context: str | None) -> np.ndarray:
        if context not in self.control:
            raise ConfigError(f"no control cells for context {context!r}; contexts with controls: {self.contexts}")
        return self.control[context]

    def delta(self, group: Group) -> np.ndarray:
        """Mean of the group minus the control mean of its context."""
        return self.means[group] - self.control_mean(group[1])

    def subset(self, groups: Iterable[Group]) -> PerturbationProfiles:
        """The same controls and gene lists with only ``groups``' means (what a method may train on)."""
        groups = list(groups)
        missing = [g for g in groups if g not in self.means]
        if missing:
            raise ConfigError(f"groups {missing[:5]} have no profile; known groups: {self.groups[:10]}")
        return PerturbationProfiles(self.gene_names, {g: self.means[g] for g in groups}, dict(self.control),
                                    dict(self.genes), {g: n for g, n in self.n_cells.items()
                                                       if g in groups or g[0] == "ctrl"})

    def gene_positions(self, symbols: Iterable[str]) -> np.ndarray:
        """Positions of ``symbols`` in ``gene_names`` (ConfigError naming any that are absent)."""
        index: Mapping[str, int] = {g: i for i, g in enumerate(self.gene_names)}
        symbols = list(symbols)
        absent = [s for s in symbols if s not in index]
        if absent:
            raise ConfigError(f"perturbed genes {absent} are not among the {self.gene_names.size} measured genes")
        return np.array([index[s] for s in symbols], dtype=np.int64)
