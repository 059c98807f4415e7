"""What several test modules share: gloo worlds, small images and shards, comparisons, eval artifacts."""
