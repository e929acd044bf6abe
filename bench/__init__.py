"""kindbench: the method-agnostic harness (config, data, DiT, diffusion, engine, train/sample/evaluate)."""
