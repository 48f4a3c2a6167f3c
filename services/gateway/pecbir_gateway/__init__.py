"""pecbir_gateway."""
