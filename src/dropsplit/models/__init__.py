"""Models that place dropout sites (they know nothing about the methods)."""

from dropsplit.models.awd import AWDLSTM
from dropsplit.models.lstm import LSTM, LSTMLayer
from dropsplit.models.toy import ElmanRNN, TinyRNNLM

__all__ = ["AWDLSTM", "LSTM", "ElmanRNN", "LSTMLayer", "TinyRNNLM"]
