"""pecbir_encryptor."""
