"""Gene regulatory networks from foundation models: gene-embedding and attention networks, gene
programs and their activity in cells, edge lists for AnnData, CSV and geneRNIB.

>>> net = embedding_network(scforge.load("default"), hvgs)       # cosine similarity of gene embeddings
>>> edges = net.edges(threshold=0.4); programs = net.programs(resolution=1.0, min_size=5)
>>> diff = attention_difference(model, adata, "stim", "STIM", "CTRL", hvgs)
"""

from scforge.tasks.grn.attention import attention_difference, attention_network, rank_normalize
from scforge.tasks.grn.embedding import embedding_network, gene_embedding_table
from scforge.data.network import (
    GeneNetwork,
    add_network,
    knn_graph,
    leiden_programs,
    program_activity,
    program_scores,
    to_generib,
    write_edges_csv,
)

__all__ = [
    "GeneNetwork",
    "add_network",
    "attention_difference",
    "attention_network",
    "embedding_network",
    "gene_embedding_table",
    "knn_graph",
    "leiden_programs",
    "program_activity",
    "program_scores",
    "rank_normalize",
    "to_generib",
    "write_edges_csv",
]
