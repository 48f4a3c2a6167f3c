"""pecbir_search."""
