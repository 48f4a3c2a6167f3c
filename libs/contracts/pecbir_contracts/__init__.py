"""pecbir_contracts."""
