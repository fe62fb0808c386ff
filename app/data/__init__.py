"""Data pipelines: corpora and shards read with Ray Data, cleaned, tokenized, streamed to trainers."""
