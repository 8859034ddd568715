"""Triton kernels of fastlstm, installed as `fastlstm.kernels`. Imports nothing from fastlstm but its constants."""
