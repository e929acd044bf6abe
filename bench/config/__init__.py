"""What a run and a suite are made of: the typed config sections (``schema``), suites (``suite``), TOML reading."""
