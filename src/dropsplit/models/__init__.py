"""Models that place dropout sites (they know nothing about the methods)."""

from dropsplit.models.awd import AWDLSTM, QRNNLM, RecurrentLM, lm_forward
from dropsplit.models.lstm import LSTM, LSTMLayer
from dropsplit.models.mlp import MLPClassifier
from dropsplit.models.qrnn import QRNN, QRNNLayer
from dropsplit.models.toy import ElmanRNN, TinyRNNLM
from dropsplit.models.transformer import TransformerLM

LanguageModel = (
    RecurrentLM | TransformerLM
)  # what the trainer drives: (tokens, state) -> (logits, state)

__all__ = [
    "AWDLSTM",
    "LSTM",
    "QRNN",
    "QRNNLM",
    "ElmanRNN",
    "LSTMLayer",
    "LanguageModel",
    "MLPClassifier",
    "QRNNLayer",
    "RecurrentLM",
    "TinyRNNLM",
    "TransformerLM",
    "lm_forward",
]
