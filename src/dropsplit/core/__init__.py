"""The core: the noise law, sites, losses, the forward contract and the paper's two regularizers.

Layer 1 of the package; it imports nothing else of dropsplit.
"""
