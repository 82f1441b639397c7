"""Model layers: the 2D Hyena operator, Conformer blocks, LSH attention, reversible layers, and the
token-grid bookkeeping they share. Plain ``torch.nn`` modules; no model library imported."""
