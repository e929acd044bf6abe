"""The parts of ``benchmarks/gpu_acceptance.py``, one module each, and what they share.

``train`` (a), ``kind`` (b), ``preempt`` (c), ``sampling`` (d) and ``metrics`` (e) each have ``run(ctx)``, which
measures in the part's own process and returns its rows (saving them with ``ctx.save`` as they come, so a part killed
at its budget keeps what it finished), and ``render(rows, info, plan)``, the Markdown lines of its table. ``common``
holds the part's context and the process handling (a subprocess killed with all it started), ``report`` the Markdown
around the tables (machine header, part page, summary).

Imported by the entry script, which puts ``benchmarks/`` on ``sys.path`` (this folder is not an installed package);
the name differs from ``gpu_acceptance`` so that the two never meet on import.
"""
