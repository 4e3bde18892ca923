"""GradSim: per-piece gradients of log P(answer | prompt) on the MLP output projections, and their cosines."""
