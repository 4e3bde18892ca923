"""The run manifest: which stages finished, with a hash of their inputs and settings, so a run can resume.

A stage is done when the manifest holds it with the same input hash and every file it wrote still has the size
and SHA-256 recorded when it was written (a truncated or hand-edited output is redone, and the run says so). A
stage's hash covers its own settings and the hashes of the stages it reads, so changing anything upstream
recomputes everything downstream of it, and nothing else.
"""

from __future__ import annotations

import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from lit_coupling import __version__
from lit_coupling.errors import UserError
from lit_coupling.outputs import MANIFEST, read_json, sha256_file, stable_hash, write_json

MANIFEST_FORMAT = "lit_coupling.manifest/1"

# What each stage reads from earlier stages.
DEPENDS_ON = {
    "pieces": (),
    "gradsim": ("pieces",),
    "ripple": ("pieces",),
    "analysis": ("pieces", "gradsim", "ripple"),
    "report": ("analysis",),
}

# Settings that change how fast a stage runs but not what it computes.
NOT_AFFECTING_RESULTS = {
    "batch_size",
    "num_workers",
    "progress",
    "stats_dir",
    "keep_shards",
    "reduce_memory_gb",
    "on_edit_error",
}


def downstream_of(name: str) -> list[str]:
    """The stages that read `name`'s files, directly or through another stage."""
    found: list[str] = []
    for stage, deps in DEPENDS_ON.items():
        if any(d == name or d in found for d in deps) and stage not in found:
            found.append(stage)
    return found


def _settings(options: Any) -> dict:
    data = asdict(options) if is_dataclass(options) else dict(options)
    return {k: v for k, v in data.items() if k not in NOT_AFFECTING_RESULTS}


def data_identity(hotpot_data: str | None) -> dict:
    if hotpot_data is None:
        return {"data": "embedded default world"}
    path = Path(hotpot_data).expanduser()
    if not path.exists():
        return {"data": hotpot_data}  # a name (real-sample) or a missing file: its reader reports which
    if not path.is_file():
        raise UserError(
            f"--hotpot_data {hotpot_data}: this is a directory, not a file; pass the HotpotQA JSON or "
            f"JSON Lines file itself (e.g. {Path(hotpot_data) / 'hotpot_dev_distractor_v1.json'})"
        )
    return {"data": str(path.resolve()), "sha256": sha256_file(path)}


def model_identity(model_path: str) -> dict:
    """The model as named, plus, for a local directory, its config and weight files (size, mtime)."""
    from lit_coupling.models.loading import resolve_model_path

    identity: dict[str, Any] = {"model": model_path}
    path = Path(resolve_model_path(model_path)).expanduser()  # an embedded name → its trained directory
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".model"))
        identity["files"] = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return identity


def stage_settings(name: str, cfg) -> dict:
    """What the outputs of stage `name` depend on, besides the stages it reads."""
    if name in ("pieces", "gradsim", "ripple"):
        model = model_identity(cfg.model_path)
    if name == "pieces":
        return {**data_identity(cfg.hotpot_data), **model, "max_samples": cfg.max_samples, "seed": cfg.seed}
    if name == "gradsim":
        return {
            **model,
            "dtype": cfg.dtype,
            "layers": cfg.layers,
            "target_pattern": cfg.target_pattern,
            "gradsim": _settings(cfg.gradsim),
        }
    if name == "ripple":
        return {
            **model,
            "dtype": cfg.dtype,
            "max_experiments": cfg.max_experiments,
            "seed": cfg.seed,
            "target_pattern": cfg.target_pattern,
            "memit": _settings(cfg.memit),
        }
    if name == "analysis":
        return {"seed": cfg.seed, "analysis": _settings(cfg.analysis)}
    if name == "report":
        return {"logger": cfg.logger}
    raise KeyError(name)


def stage_hashes(cfg, running: list[str], recorded: dict[str, dict] | None = None) -> dict[str, str]:
    """The input hash of each stage in `running` and of everything upstream of it.

    An upstream stage that is not run now stands for what it left on disk: its recorded hash is used, so
    `--stages analysis,report` on a finished run neither needs nor loads the model.
    """
    recorded = recorded or {}
    hashes: dict[str, str] = {}

    def resolve(name: str) -> str:
        if name not in hashes:
            if name not in running and "hash" in recorded.get(name, {}):
                hashes[name] = recorded[name]["hash"]
            else:
                upstream = {dep: resolve(dep) for dep in DEPENDS_ON[name]}
                hashes[name] = stable_hash(
                    {"stage": name, "version": __version__, "settings": stage_settings(name, cfg), "upstream": upstream}
                )
        return hashes[name]

    return {name: resolve(name) for name in running}


class DamagedManifest(UserError):
    """manifest.json cannot be read: the message names it and the ways out."""


def damaged(path: Path, problem: str) -> DamagedManifest:
    return DamagedManifest(
        f"{path} is damaged ({problem}). It records which stages of the run in {path.parent} finished. To keep "
        f"the outputs and redo every stage, move it away (mv {path} {path}.bad) and run the same command again; "
        f"or pass --overwrite to start a new run there (the earlier files are set aside until it has finished a "
        f"stage)."
    )


def read_manifest(path: Path) -> dict:
    """The manifest's content, checked for the structure this module writes."""
    try:
        doc = read_json(path)
    except UnicodeDecodeError:
        raise damaged(path, "not UTF-8 text") from None
    except ValueError as error:  # json.JSONDecodeError
        raise damaged(path, f"not valid JSON: {error}") from None
    except RecursionError:
        raise damaged(path, "JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise damaged(path, f"expected a JSON object, found a {type(doc).__name__}")
    if doc.get("format") != MANIFEST_FORMAT:
        raise damaged(path, f"format {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if not isinstance(doc.get("model"), str):
        raise damaged(path, f"'model' should be the model's name, found {doc.get('model')!r}")
    stages = doc.get("stages")
    if not isinstance(stages, dict):
        raise damaged(path, f"'stages' should be an object, found {type(stages).__name__}")
    for name, record in stages.items():
        files = record.get("files") if isinstance(record, dict) else None
        if (
            name not in DEPENDS_ON
            or not isinstance(record.get("hash"), str)
            or not isinstance(files, list)
            or not all(isinstance(f, str) for f in files)
            or not isinstance(record.get("checks", {}), dict)
        ):
            raise damaged(path, f"the record of stage {name!r} is not one this version writes")
    return doc


def file_check(path: Path) -> dict:
    """What resume compares: the size and SHA-256 of an output as its stage wrote it."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


class Manifest:
    def __init__(self, out_dir: Path, model: str):
        self.path = Path(out_dir) / MANIFEST
        self.model = model
        self.stages: dict[str, dict] = {}

    @staticmethod
    def recorded_model(out_dir: Path) -> str | None:
        path = Path(out_dir) / MANIFEST
        return read_manifest(path)["model"] if path.is_file() else None

    @classmethod
    def open(cls, out_dir: Path, model: str, overwrite: bool = False) -> Manifest:
        manifest = cls(out_dir, model)
        if manifest.path.exists() and not overwrite:
            doc = read_manifest(manifest.path)
            if doc.get("model") != model:
                raise UserError(
                    f"{out_dir} holds a run of model {doc.get('model')!r}, not {model!r}: choose "
                    f"another --output_dir, or pass --overwrite to replace that run (it is set aside "
                    f"until the new run has finished a stage)."
                )
            manifest.stages = doc.get("stages", {})
        return manifest

    def is_done(self, name: str, stage_hash: str) -> bool:
        return self.check(name, stage_hash) is None

    def check(self, name: str, stage_hash: str) -> str | None:
        """None when stage `name` finished with these inputs and its files are as it wrote them; else why not.

        The reason is "" when the stage simply has not run with these inputs, and names the file otherwise.
        """
        record = self.stages.get(name)
        if not record or record.get("hash") != stage_hash:
            return ""
        checks = record.get("checks", {})
        for f in record.get("files", []):
            path = self.path.parent / f
            if not path.is_file():
                return f"{f} is missing"
            expected = checks.get(f)
            if expected is None:  # a manifest of an older version: existence is all it recorded
                continue
            size = path.stat().st_size
            if size != expected.get("size"):
                return f"{f} has {size} bytes, not the {expected.get('size')} its stage wrote (truncated or edited)"
            if sha256_file(path) != expected.get("sha256"):
                return f"{f} was changed after its stage wrote it (its SHA-256 differs)"
        return None

    def record(self, name: str, stage_hash: str, files: list[str], seconds: float, summary: str) -> bool:
        """Record a finished stage; True when its files differ from what the manifest held for it before."""
        out = self.path.parent.resolve()
        relative = [
            str(Path(f).resolve().relative_to(out)) if Path(f).resolve().is_relative_to(out) else str(f) for f in files
        ]
        checks = {f: file_check(self.path.parent / f) for f in relative}
        previous = self.stages.get(name) or {}
        changed = previous.get("checks") != checks
        self.stages[name] = {
            "hash": stage_hash,
            "files": relative,
            "checks": checks,
            "seconds": round(seconds, 3),
            "summary": summary,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if changed:  # what was computed from the earlier files is no longer done (every rank reads it so)
            for stage in downstream_of(name):
                self.stages.pop(stage, None)
        self.save()
        return changed

    def save(self) -> None:
        write_json(self.path, {"format": MANIFEST_FORMAT, "model": self.model, "stages": self.stages})


# --overwrite sets the earlier run aside here (inside the output directory, so moving is a rename) and brings it
# back when the new run fails before its first stage finishes.
SET_ASIDE = ".overwritten-run"


def _run_files(out: Path) -> list[str]:
    """The files of the run in `out`: those its manifest lists, the manifest, and any file with an output name."""
    from lit_coupling import outputs

    names = {value for key, value in vars(outputs).items() if key.isupper() and isinstance(value, str) and "." in value}
    path = out / MANIFEST
    try:
        for record in read_manifest(path)["stages"].values():
            names.update(record["files"])
    except (UserError, OSError):  # no manifest, or a damaged one: the output names and the manifest itself
        pass
    return sorted(n for n in names if (out / n).is_file() and (out / n).resolve().is_relative_to(out.resolve()))


def set_aside(out: Path) -> list[str]:
    """Move the run in `out` into `out/.overwritten-run`, manifest first (a kill half-way leaves no manifest, and the
    next command moves everything back). An earlier set-aside run that a newer one already replaced goes."""
    import os
    import shutil

    out = Path(out)
    backup = out / SET_ASIDE
    if backup.exists():
        shutil.rmtree(backup)
    files = _run_files(out)
    files.sort(key=lambda n: n != MANIFEST)
    backup.mkdir()
    for name in files:
        target = backup / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / name, target)
    return files


def restore_set_aside(out: Path) -> list[str]:
    """Put the files of `out/.overwritten-run` back in place (over anything the failed new run wrote there)."""
    import os
    import shutil

    out = Path(out)
    backup = out / SET_ASIDE
    if not backup.is_dir():
        return []
    files = sorted(str(p.relative_to(backup)) for p in backup.rglob("*") if p.is_file())
    files.sort(key=lambda n: n == MANIFEST)  # the manifest last: it says the files are there
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(backup / name, out / name)
    shutil.rmtree(backup)
    return files


def discard_set_aside(out: Path) -> bool:
    import shutil

    backup = Path(out) / SET_ASIDE
    if backup.exists():
        shutil.rmtree(backup)
        return True
    return False


def interrupted_overwrite(out: Path) -> bool:
    """A set-aside run is waiting while no stage of the run that replaced it has finished: an --overwrite that was
    killed before its first stage finished. Its earlier run must come back."""
    if not (Path(out) / SET_ASIDE).is_dir():
        return False
    path = Path(out) / MANIFEST
    if not path.exists():
        return True
    try:
        return not read_manifest(path)["stages"]
    except UserError:
        return False
