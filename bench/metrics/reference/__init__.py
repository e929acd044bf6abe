"""Reference statistics a sample batch is scored against: loading ADM's and ours (``statistics``), building ours."""
