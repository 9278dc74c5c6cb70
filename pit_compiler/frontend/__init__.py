"""Capture a model, find its sparse operators, replace them with PIT kernels."""
