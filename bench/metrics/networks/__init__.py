"""The feature networks of the metrics (Inception-v3, DINOv2, the synthetic suite's domain CNN), their offline
weights, the resizes they expect, and sharded feature extraction."""
