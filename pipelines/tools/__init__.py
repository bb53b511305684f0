"""Data tools: ingest to Parquet shards, format conversion, dataset digests."""
