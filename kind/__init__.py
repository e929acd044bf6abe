"""KIND: decomposable DiT with learngenes, tailors and a class gate (issue 5)."""
