"""Models that place dropout sites (they know nothing about the methods)."""

from dropsplit.models.toy import ElmanRNN, TinyRNNLM

__all__ = ["ElmanRNN", "TinyRNNLM"]
