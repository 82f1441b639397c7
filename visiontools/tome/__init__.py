"""Token merging algorithms: pure tensor functions with no model library imported.

- :mod:`~visiontools.tome.merge`: ToMe's bipartite soft matching, weighted merging, source maps, r schedules.
- :mod:`~visiontools.tome.r_text`: the r grammar as text (command lines, configs, the demo, tables).
- :mod:`~visiontools.tome.methods`: ToFu, PiToMe and pruning on the same plan/apply interface.
- :mod:`~visiontools.tome.budget`: solving an r schedule for a FLOP or speed budget.
- :mod:`~visiontools.tome.merge2d`: ToMe for Stable Diffusion (2D strided destination grid) and downsampling.
- :mod:`~visiontools.tome.merge_grid`: merged tokens through operations that need the full grid.
- :mod:`~visiontools.tome.vis`: pictures of which patches merged.
"""
