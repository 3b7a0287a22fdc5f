"""LRC-BERT knowledge distillation: the library shared by the general and task stages."""

__version__ = "0.1.0"
