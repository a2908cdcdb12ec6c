"""distsent: a distributed trainer for an LSTM sentiment classifier on IMDB, built on Hugging Face Accelerate."""

__version__ = "0.1.0"
