"""Pure-PyTorch versions of every op: the executable spec and the CPU fallback."""
