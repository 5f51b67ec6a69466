"""Data: prepared Parquet shards and their codecs, dataset formats, built-in datasets, prepare, augmentation."""
