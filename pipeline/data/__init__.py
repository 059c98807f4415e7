"""The data stage: synthesise and pack WebDataset shards, tokenise captions, stream batches."""
from pipeline.data.shards import DataError, ShardWriter, resolve_shards
from pipeline.data.stream import gather_state, merge_states, open_stream, open_train_stream
from pipeline.data.synth import synthesize
from pipeline.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["DataError", "ShardWriter", "Tokenizer", "gather_state", "load_tokenizer", "merge_states", "open_stream",
           "open_train_stream", "resolve_shards", "synthesize", "train_tokenizer"]
