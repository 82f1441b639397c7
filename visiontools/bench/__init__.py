"""Benchmarks (``visiontools bench TARGET``): each module gives ``add_arguments(parser)`` and ``run(args)``.
Candidates are timed interleaved in one process (:mod:`visiontools.timing`); peak memory comes from
:mod:`visiontools.bench.memory`."""
