"""The data stage: synthesise and pack WebDataset shards, check samples, tokenise captions, stream batches."""
from pipeline.data.samples import BadSample, Sample, validate_sample
from pipeline.data.shards import DataError, ShardWriter, resolve_shards
from pipeline.data.stream import (
    StreamOptions,
    data_tokenizer,
    gather_state,
    layout_world_sizes,
    merge_states,
    open_stream,
    open_train_stream,
    run_streams,
    world_sizes,
)
from pipeline.data.synth import synthesize
from pipeline.data.tokenizer import Tokenizer, clip_tokenizer, load_tokenizer, train_tokenizer, with_start_token

__all__ = ["BadSample", "DataError", "Sample", "ShardWriter", "StreamOptions", "Tokenizer", "clip_tokenizer",
           "data_tokenizer", "gather_state", "layout_world_sizes", "load_tokenizer", "merge_states", "open_stream",
           "open_train_stream", "resolve_shards", "run_streams", "synthesize", "train_tokenizer", "validate_sample",
           "with_start_token", "world_sizes"]
