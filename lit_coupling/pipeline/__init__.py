"""The run: `lit-coupling run` and what only it needs, above the domain packages.

    config.py     RunConfig (the flags) and TrainerOptions, parsed with jsonargparse
    stages.py     the stage functions, by name in STAGES (pieces → gradsim → ripple → analysis → report)
    run.py        runs the chosen stages in order, resumable (`lit-coupling run`)
    manifest.py   which stages finished, with the hash of their inputs
    preflight.py  the checks before the first stage computes

Imports go one way: this package imports the domain packages (data, gradients, editing, analysis, models, inject,
...), and no domain module imports it (tests/test_layout.py checks).
"""
