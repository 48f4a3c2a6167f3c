"""Sub-commands of `pecbir`; each module exposes `register(subparsers)`."""
