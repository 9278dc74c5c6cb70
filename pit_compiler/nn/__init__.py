"""Drop-in modules for explicit control: each replaces the PyTorch module it names."""
