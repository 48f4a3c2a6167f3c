"""pecbir."""
