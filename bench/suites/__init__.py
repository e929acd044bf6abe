"""Shipped suites (TOML data files); see bench.config.suite for the format."""
