"""The metrics themselves, on features: Fréchet distances, Inception Score, precision/recall, clean-FID/KID."""
