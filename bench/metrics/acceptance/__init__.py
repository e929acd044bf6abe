"""Acceptance procedures with real weights, the offline stand-ins CI uses instead, and test oracles."""
