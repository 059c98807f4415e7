"""The curation stage: embed a pool of shards (`embed`, on Ray Data), then keep the pairs that pass the
curation rules (`filter`: CLIP score, near-duplicates, MetaCLIP-style balance) as new shards with their lineage."""
from pipeline.curate.embed import EmbedSummary, embed, embedding_files, read_embedding_meta
from pipeline.curate.filter import FilterSummary, Rules, filter_pool

__all__ = ["EmbedSummary", "FilterSummary", "Rules", "embed", "embedding_files", "filter_pool", "read_embedding_meta"]
