"""One pure module per VAE family."""
