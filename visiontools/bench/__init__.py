"""Benchmarks (``visiontools bench TARGET``): each module gives ``add_arguments(parser)`` and ``run(args)``.
Candidates are timed interleaved in one process (:mod:`visiontools.timing`); peak memory comes from
:mod:`visiontools.bench.memory`. Every target reports through ``visiontools.timing.write_results``
(markdown table printed and written to ``--out-md``, the full result to ``--out-json``, a plot to
``--plot`` where offered; figures via ``timing.subplots`` / ``timing.save_figure``)."""
