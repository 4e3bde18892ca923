"""`lit-coupling`: one console script, a subcommand per job.

    run          the whole experiment: pieces → GradSim → MEMIT ripple → analysis → report
    fit          LightningCLI: knowledge injection (teach a model the facts)
    predict      LightningCLI: GradSim or MEMIT ripple as a predict job (DDP/FSDP flags)
    check-model  is this HF causal LM supported? family, target modules, a gradient smoke test
    make-world   write a synthetic 2-hop world in HotpotQA's schema
    compare      put several runs side by side
"""

from __future__ import annotations

import importlib
import sys

# name → (module, function, one-line help). Functions take argv (without the subcommand) and return an exit code.
COMMANDS = {
    "run": ("lit_coupling.run", "main", "the whole experiment on one model, stage by stage, resumable"),
    "fit": ("lit_coupling.cli", "lightning_entry", "LightningCLI fit (knowledge injection)"),
    "validate": ("lit_coupling.cli", "lightning_entry", "LightningCLI validate"),
    "test": ("lit_coupling.cli", "lightning_entry", "LightningCLI test"),
    "predict": ("lit_coupling.cli", "lightning_entry", "LightningCLI predict (GradSim, MEMIT ripple)"),
    "check-model": ("lit_coupling.check_model", "main", "check that a HF causal LM is supported, with a smoke test"),
    "make-world": ("lit_coupling.data.world", "main", "write a synthetic 2-hop world in HotpotQA format"),
    "compare": ("lit_coupling.analysis.compare", "main", "compare the outputs of several runs"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lit-coupling <command> [options]   (lit-coupling <command> --help for its options)", "",
             "Does gradient similarity between two facts predict how much editing one disturbs the other?", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _configure_jsonargparse() -> None:
    """Option help comes from the docstrings under dataclass fields (litgpt style)."""
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (ImportError, TypeError):  # older jsonargparse: help without the field docstrings
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lit-coupling: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function, _ = COMMANDS[name]
    _configure_jsonargparse()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("lit_coupling"):
            print(f"lit-coupling {name}: this command is not available in this version of lit_coupling "
                  f"({error.name} is missing).", file=sys.stderr)
            return 2
        raise
    entry = getattr(module, function)
    result = entry([name, *rest]) if function == "lightning_entry" else entry(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
