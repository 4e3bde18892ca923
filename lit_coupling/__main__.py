"""`lit-coupling`: one console script, a subcommand per job.

    run          the whole experiment: pieces → GradSim → MEMIT ripple → analysis → report
    fit          LightningCLI: knowledge injection (teach a model the facts)
    predict      LightningCLI: GradSim or MEMIT ripple as a predict job (DDP/FSDP flags)
    check-model  is this HF causal LM supported? family, target modules, a gradient smoke test
    make-world   write a synthetic 2-hop world in HotpotQA's schema
    compare      put several runs side by side

Every error ends as a message and an exit status other than 0: 2 for a problem with the input or set-up (the
message says what to change), 1 for a bug in lit_coupling (its traceback goes to a log file the message names),
130 when interrupted. `--verbose` (anywhere on the line) or LIT_COUPLING_VERBOSE=1 also prints the traceback.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path


# Each command is a small function: argv (without the subcommand) → exit code. Its module is imported inside it, so
# `lit-coupling --help` (and every other command) loads only what it runs.
def run(argv: list[str]) -> int:
    from lit_coupling.pipeline.run import main

    return main(argv)


def lightning(subcommand: str) -> Callable[[list[str]], int]:
    def entry(argv: list[str]) -> int:
        from lit_coupling.cli import lightning_entry

        return lightning_entry([subcommand, *argv])

    return entry


def check_model(argv: list[str]) -> int:
    from lit_coupling.check_model import main

    return main(argv)


def make_world(argv: list[str]) -> int:
    from lit_coupling.data.world import main

    return main(argv)


def compare(argv: list[str]) -> int:
    from lit_coupling.analysis.compare import main

    return main(argv)


def forecast(argv: list[str]) -> int:
    from lit_coupling.editing.forecast_cli import main

    return main(argv)


# name → (function, one-line help). Registering a command is one line here (and its function above).
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "run": (run, "the whole experiment on one model, stage by stage, resumable"),
    "fit": (lightning("fit"), "LightningCLI fit (knowledge injection)"),
    "validate": (lightning("validate"), "LightningCLI validate"),
    "test": (lightning("test"), "LightningCLI test"),
    "predict": (lightning("predict"), "LightningCLI predict (GradSim, MEMIT ripple)"),
    "check-model": (check_model, "check that a HF causal LM is supported, with a smoke test"),
    "make-world": (make_world, "write a synthetic 2-hop world in HotpotQA format"),
    "compare": (compare, "compare the outputs of several runs"),
    "forecast": (forecast, "rank stored facts by an edit's predicted ripple before making it (--validate: check)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lit-coupling <command> [options]   (lit-coupling <command> --help for its options)",
        "",
        "Does gradient similarity between two facts predict how much editing one disturbs the other?",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "--verbose (with any command): print the traceback of an error as well as its message"]
    return "\n".join(lines)


def write_error_log(name: str, argv: list[str], error: BaseException) -> Path | None:
    """The command line and the traceback in a log file; None when no log directory is writable."""
    from lit_coupling.cache import cache_root

    text = (
        f"lit-coupling {name} {' '.join(argv)}\n{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  "
        f"python {sys.version.split()[0]}\n\n"
        + "".join(traceback.format_exception(type(error), error, error.__traceback__))
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for directory in (cache_root() / "logs", Path(os.environ.get("TMPDIR") or "/tmp")):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"lit-coupling-{name}-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def report_error(name: str, argv: list[str], error: BaseException, verbose: bool) -> int:
    """One message for any error that reached the top; the exit status says which kind it was."""
    from lit_coupling.errors import UserError

    prefix = f"lit-coupling {name}"
    if verbose:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    if isinstance(error, KeyboardInterrupt):
        print(
            f"{prefix}: interrupted. Run the same command again to resume from the last finished stage.",
            file=sys.stderr,
        )
        return 130
    if isinstance(error, UserError):
        print(f"{prefix}: {error}", file=sys.stderr)
        return 2
    log = write_error_log(name, argv, error)
    where = (f"The full traceback is in {log}" if log else "No log file could be written") + (
        "." if verbose else " (--verbose prints it here)."
    )
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        print(
            f"{prefix}: out of memory ({type(error).__name__}). Lower the batch size of the stage that ran "
            f"(--gradsim.batch_size, --memit.batch_size), use --dtype bfloat16 on a GPU, or a larger machine. "
            f"{where}",
            file=sys.stderr,
        )
        return 2
    if isinstance(error, OSError) and (error.filename or error.strerror):
        target = f" {error.filename}" if error.filename else ""
        print(
            f"{prefix}: the system refused an operation on{target}: {error.strerror or error}. Check the path, "
            f"its permissions and the free disk space. {where}",
            file=sys.stderr,
        )
        return 2
    first_line = str(error).splitlines()[0][:300] if str(error) else ""
    print(
        f"{prefix}: internal error, a bug in lit_coupling rather than a problem with your input "
        f"({type(error).__name__}: {first_line}).\n{where} Please report it with that file and the command line.",
        file=sys.stderr,
    )
    return 1


def _configure_jsonargparse() -> None:
    """Option help comes from the docstrings under dataclass fields (litgpt style)."""
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (ImportError, TypeError):  # older jsonargparse: help without the field docstrings
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("LIT_COUPLING_VERBOSE", "") not in ("", "0")
    if "--verbose" in argv:
        argv = [a for a in argv if a != "--verbose"]
        # DDP re-executes sys.argv in every rank: the flag travels in the environment instead.
        os.environ["LIT_COUPLING_VERBOSE"] = "1"
        sys.argv[:] = [a for a in sys.argv if a != "--verbose"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lit-coupling: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    entry, _ = COMMANDS[name]
    _configure_jsonargparse()
    try:
        result = entry(rest)
    except SystemExit:  # argument parsers exit with their own message and status
        raise
    except BaseException as error:  # noqa: BLE001 - the one place every remaining error becomes a message
        return report_error(name, rest, error, verbose)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
