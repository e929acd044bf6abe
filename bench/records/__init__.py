"""Records and provenance, for the harness and the metrics alike: content hashes, atomic writes, the environment a
result came from, the timestamp and checks every record kind shares, code fingerprints, and the store of immutable
JSON records."""
