"""The run manifest: which stages finished, with a hash of their inputs and settings, so a run can resume.

A stage is done when the manifest holds it with the same input hash and all its files exist. A stage's hash
covers its own settings and the hashes of the stages it reads, so changing anything upstream recomputes
everything downstream of it, and nothing else.
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
NOT_AFFECTING_RESULTS = {"batch_size", "num_workers", "progress", "stats_dir", "keep_shards", "reduce_memory_gb",
                         "on_edit_error"}


def _settings(options: Any) -> dict:
    data = asdict(options) if is_dataclass(options) else dict(options)
    return {k: v for k, v in data.items() if k not in NOT_AFFECTING_RESULTS}


def data_identity(hotpot_data: str | None) -> dict:
    if hotpot_data is None:
        return {"data": "embedded default world"}
    path = Path(hotpot_data)
    if not path.exists():
        return {"data": hotpot_data}  # a hub dataset name: its loader reports a missing file
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
        return {**model, "dtype": cfg.dtype, "layers": cfg.layers, "target_pattern": cfg.target_pattern,
                "gradsim": _settings(cfg.gradsim)}
    if name == "ripple":
        return {**model, "dtype": cfg.dtype, "max_experiments": cfg.max_experiments, "seed": cfg.seed,
                "target_pattern": cfg.target_pattern, "memit": _settings(cfg.memit)}
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
                hashes[name] = stable_hash({"stage": name, "version": __version__,
                                            "settings": stage_settings(name, cfg), "upstream": upstream})
        return hashes[name]

    return {name: resolve(name) for name in running}


class Manifest:
    def __init__(self, out_dir: Path, model: str):
        self.path = Path(out_dir) / MANIFEST
        self.model = model
        self.stages: dict[str, dict] = {}

    @staticmethod
    def recorded_model(out_dir: Path) -> str | None:
        path = Path(out_dir) / MANIFEST
        return read_json(path).get("model") if path.exists() else None

    @classmethod
    def open(cls, out_dir: Path, model: str, overwrite: bool = False) -> Manifest:
        manifest = cls(out_dir, model)
        if manifest.path.exists() and not overwrite:
            doc = read_json(manifest.path)
            if doc.get("model") != model:
                raise UserError(f"{out_dir} holds a run of model {doc.get('model')!r}, not {model!r}: choose "
                                f"another --output_dir, or pass --overwrite to replace that run.")
            manifest.stages = doc.get("stages", {})
        return manifest

    def is_done(self, name: str, stage_hash: str) -> bool:
        record = self.stages.get(name)
        if not record or record.get("hash") != stage_hash:
            return False
        return all((self.path.parent / f).exists() for f in record.get("files", []))

    def record(self, name: str, stage_hash: str, files: list[str], seconds: float, summary: str) -> None:
        out = self.path.parent.resolve()
        relative = [str(Path(f).resolve().relative_to(out)) if Path(f).resolve().is_relative_to(out) else str(f)
                    for f in files]
        self.stages[name] = {"hash": stage_hash, "files": relative, "seconds": round(seconds, 3),
                             "summary": summary, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.save()

    def save(self) -> None:
        write_json(self.path, {"format": MANIFEST_FORMAT, "model": self.model, "stages": self.stages})

    def clear(self) -> list[Path]:
        """--overwrite: remove the files this run recorded and the manifest; leave anything else alone."""
        removed = []
        if self.path.exists():
            doc = read_json(self.path)
            for record in doc.get("stages", {}).values():
                for f in record.get("files", []):
                    target = self.path.parent / f
                    if target.is_file():
                        target.unlink()
                        removed.append(target)
            self.path.unlink()
        self.stages = {}
        return removed
