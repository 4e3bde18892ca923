"""lit_coupling: does gradient similarity between two facts predict how much editing one disturbs the other?

The pipeline, one subpackage per stage: data (HotpotQA → knowledge pieces) → gradients (GradSim) →
editing (MEMIT ripple) → analysis (correlation, plots, report). `models` holds the family adapter table.
"""

__version__ = "0.1.0"
