"""The crawl pipeline's durable stores: frontier, raw store, document store and Parquet export."""
