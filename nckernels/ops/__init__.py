"""Autograd custom ops (``torch.library.custom_op``), one file per op family."""
