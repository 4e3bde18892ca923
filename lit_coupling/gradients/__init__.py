"""GradSim: per-piece gradients of log P(answer | prompt) on the MLP output projections, and their cosines.

Stays import-light (run.py reads `options` at start-up): the Lightning classes live in `gradients.module` and
`gradients.writer`.
"""
