"""The data stage: synthesise and pack WebDataset shards, check samples, tokenise captions, stream batches."""
from pipeline.data.samples import BadSample, Sample, validate_sample
from pipeline.data.shards import DataError, ShardWriter, resolve_shards
from pipeline.data.stream import StreamOptions, gather_state, merge_states, open_stream, open_train_stream
from pipeline.data.synth import synthesize
from pipeline.data.tokenizer import Tokenizer, clip_tokenizer, load_tokenizer, train_tokenizer

__all__ = ["BadSample", "DataError", "Sample", "ShardWriter", "StreamOptions", "Tokenizer", "clip_tokenizer",
           "gather_state", "load_tokenizer", "merge_states", "open_stream", "open_train_stream", "resolve_shards",
           "synthesize", "train_tokenizer", "validate_sample"]
