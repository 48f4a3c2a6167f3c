"""pecbir_indexer."""
