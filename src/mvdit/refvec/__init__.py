"""Parity with upstream: the reference-vector checker (`check`) and the code only it needs (`parity`)."""
