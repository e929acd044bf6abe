"""Records and provenance, for the harness and the metrics alike: content hashes, atomic writes, the environment a
result came from, code fingerprints, and the store of immutable JSON records."""
