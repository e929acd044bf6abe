"""Shipped suites (TOML data files); see bench.suite for the format."""
