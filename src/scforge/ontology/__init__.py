"""The Cell Ontology offline: terms and lookups, label mapping, and scCello's cell-type relations
(personalised PageRank similarity levels and the ancestor mask)."""

from scforge.ontology.cell_ontology import CellOntology, OntologyTerm, load_cell_ontology
from scforge.ontology.mapping import LabelMapping, load_label_table, load_marker_table, map_labels
from scforge.ontology.similarity import (
    CellTypeRelations,
    OntologyGraph,
    cell_type_relations,
    ontology_graph,
    personalized_pagerank,
    similarity_levels,
)

__all__ = [
    "CellOntology", "CellTypeRelations", "LabelMapping", "OntologyGraph", "OntologyTerm", "cell_type_relations",
    "load_cell_ontology", "load_label_table", "load_marker_table", "map_labels", "ontology_graph",
    "personalized_pagerank", "similarity_levels",
]
