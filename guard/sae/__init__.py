"""Sparse autoencoders through sae-lens (the ``sae`` extra, imported only when used)."""
