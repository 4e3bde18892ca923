"""A real model's whole run, stage by stage: where the time goes and what the edits did (issue 12).

    python benchmarks/real_run.py --run -- --model_path smollm2-135m --hotpot_data FILE --max_experiments 10 \
        --output_dir RUN --memit.stats_dir EMPTY_DIR --logger none       # runs it, then reports
    python benchmarks/real_run.py RUN [RUN ...]                          # reports finished runs

Prints, per run: the wall time of every stage (manifest.json), inside the ripple stage the before-edit scoring of
every piece, the key covariance (computed, or read from its cache) and per edit the target optimisation, the update
and the re-scoring of every piece (mean, and per 100 pieces); then the edits' figures: pieces and sources known,
same-type counterfactuals (types, unmatched), efficacy P(new) > P(true), new answer generated, CounterFact's
paraphrase and neighbourhood scores, and the analysis verdict. With --run it also gives the command's wall time,
its CPU time (user + system of the run and its children: on a machine shared with other jobs the wall time says
more about the neighbours than about the code) and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def summarise_run(run: Path) -> dict:
    """Stage times and edit figures of a finished run directory."""
    manifest = _load(run / "manifest.json") or {}
    ripple = _load(run / "ripple_experiments.json") or {}
    analysis = _load(run / "correlation_analysis.json") or {}
    stages = {name: s.get("seconds") for name, s in manifest.get("stages", {}).items()}
    experiments = [e for e in ripple.get("experiments", []) if e.get("status") == "ok"]
    n_pieces = len(ripple.get("piece_ids", []))
    baseline = ripple.get("baseline", {})
    requests = ripple.get("requests", {})
    summary = ripple.get("summary", {})
    times = [e.get("time_s", {}) for e in experiments]
    cov_layers = ripple.get("covariance", {}).get("layers", {})
    measure = _mean(t.get("measure") for t in times)
    verdict = analysis.get("verdict", {})
    verdict = verdict.get("conclusion") or verdict.get("text") if isinstance(verdict, dict) else verdict
    return {
        "run": str(run),
        "stages_s": stages,
        "total_s": sum(v for v in stages.values() if v is not None),
        "pieces": n_pieces,
        "baseline_scoring_s": baseline.get("time_s"),
        "covariance_s": ripple.get("covariance", {}).get("time_s"),
        "covariance_cached": all(layer.get("cached") for layer in cov_layers.values()) if cov_layers else None,
        "edit_targets_s": _mean(t.get("targets") for t in times),
        "edit_updates_s": _mean(t.get("updates") for t in times),
        "rescoring_s": measure,
        "rescoring_per_100_pieces_s": measure / n_pieces * 100 if measure is not None and n_pieces else None,
        "pieces_known": baseline.get("n_known"),
        "sources": requests.get("sources"),
        "sources_known": requests.get("known"),
        "unmatched": requests.get("unmatched"),
        "types": summary.get("answer_types"),
        "edits": summary.get("edits"),
        "known_before": summary.get("known_before"),
        "efficacy": summary.get("efficacy_logp"),
        "generated": summary.get("efficacy_generated"),
        "paraphrase": summary.get("paraphrase_score"),
        "neighborhood": summary.get("neighborhood_score"),
        "verdict": verdict,
    }


def print_summary(s: dict) -> None:
    print(f"\n## {s['run']}")
    print("| stage | s |\n|---|---:|")
    for name, seconds in s["stages_s"].items():
        print(f"| {name} | {_fmt(seconds, 1)} |")
    print(f"| **all stages** | **{_fmt(s['total_s'], 1)}** |")
    cached = {True: " (read from its cache)", False: " (computed)", None: ""}[s["covariance_cached"]]
    print(
        f"\nripple stage: score {s['pieces']} pieces before editing {_fmt(s['baseline_scoring_s'], 1, ' s')}; "
        f"key covariance{cached} {_fmt(s['covariance_s'], 1, ' s')}; per edit: target "
        f"{_fmt(s['edit_targets_s'], 1, ' s')}, update {_fmt(s['edit_updates_s'], 2, ' s')}, re-scoring every "
        f"piece {_fmt(s['rescoring_s'], 2, ' s')} ({_fmt(s['rescoring_per_100_pieces_s'], 2, ' s')} per 100 "
        f"pieces)"
    )
    print(
        f"known: {s['pieces_known']} of {s['pieces']} pieces, {s['sources_known']} of {s['sources']} sources; "
        f"unmatched (no same-type counterfactual): {s['unmatched']}; types {s['types']}"
    )
    print(
        f"edits {s['edits']}: on known facts {_fmt(s['known_before'])}, efficacy P(new) > P(true) "
        f"{_fmt(s['efficacy'])}, new answer generated {_fmt(s['generated'])}, paraphrase {_fmt(s['paraphrase'])}, "
        f"neighbourhood {_fmt(s['neighborhood'])}; verdict: {s['verdict']}"
    )


def find_output_dir(args: list[str]) -> Path:
    for i, a in enumerate(args):
        if a == "--output_dir" and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--output_dir="):
            return Path(a.split("=", 1)[1])
    raise SystemExit("--run needs --output_dir DIR among the run's arguments")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="finished run directories")
    parser.add_argument("--run", action="store_true", help="run `lit-coupling run` with the arguments after --")
    parser.add_argument("--json", help="write the summaries here")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    extra = {}
    if args.run:
        out = find_output_dir(run_args)
        load = os.getloadavg()
        start = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        code = subprocess.call([sys.executable, "-m", "lit_coupling", "run", *run_args])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        extra = {
            "wall_s": time.perf_counter() - start,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_before": load,
            "load_after": os.getloadavg(),
            "exit_code": code,
        }
        print(
            f"\n`lit-coupling run {' '.join(run_args)}`: exit {code}, wall {extra['wall_s']:.1f} s, CPU "
            f"{extra['cpu_s']:.1f} s, load average {load[0]:.1f} before, {extra['load_after'][0]:.1f} after"
        )
        runs.append(out)
    summaries = [summarise_run(run) | (extra if args.run and run == runs[-1] else {}) for run in runs]
    for s in summaries:
        print_summary(s)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
