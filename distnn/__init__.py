"""distnn: data-parallel training of a hand-written MLP over MPI, bit-identical for any rank count."""

__version__ = "0.1.0"
