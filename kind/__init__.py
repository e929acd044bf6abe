"""KIND: decomposable DiT with learngenes, tailors and a class gate (issue 5; see kind/README.md).

Reached by the harness only through the method registry (``kind``, ``kind_nogate``, ``kind_fulltransfer`` ->
``kind.kind``). Modules: ``config`` (options and defaults), ``gate`` (class gate tables and the label hand-off),
``layers`` (decomposition surgery, gate install, merge), ``recombine`` (learngene/tailor files and recombination),
``kind`` (the Method).
"""
