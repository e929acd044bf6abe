"""Reporting: leaderboards from records (``leaderboard``), their Markdown/LaTeX renderings (``tables``), plots."""
