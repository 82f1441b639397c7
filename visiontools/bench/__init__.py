"""Benchmarks (``visiontools bench TARGET``): each module gives ``add_arguments(parser)`` and ``run(args)``.
Candidates are timed interleaved in one process (:mod:`visiontools.timing`); peak memory comes from
:mod:`visiontools.bench.memory`. Every target reports through ``visiontools.timing.write_results``
(markdown table printed and written to ``--out-md``, the full result to ``--out-json``, a plot to
``--plot`` where offered; figures via ``timing.subplots`` / ``timing.save_figure``)."""


def shared_copy(module):
    """A structural copy of ``module`` sharing every parameter and buffer (no extra weight memory), so
    each benchmark candidate carries its own hooks and patch."""
    import copy

    return copy.deepcopy(module, {id(t): t for t in [*module.parameters(), *module.buffers()]})
