"""fastvar's own model definitions, key-compatible with the official checkpoints."""
