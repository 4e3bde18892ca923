"""Checks `lit-coupling run` makes before its first stage computes: the output directory, the HotpotQA file and the
model, so a bad input is refused in seconds with a message naming it, not after hours of gradients.

The settings themselves are checked by each options dataclass's `validate()`; what is checked here needs the
filesystem or the model's config (the layer count a `--layers` range must fall in).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from lit_coupling.errors import SettingError, UserError

# A sentence index far beyond any paragraph (HotpotQA paragraphs hold a few dozen sentences); below 2**63 so Arrow
# can store it, far above so a dangling reference is still only skipped by the extraction.
MAX_SENT_ID = 2**31 - 1


def check_output_dir(out: Path) -> None:
    """`out` is, or can become, a directory this process can write into. Tried for real (os.access says yes to
    root, and knows nothing of /proc or read-only mounts); what the try creates is removed again."""
    out = Path(out)
    hint = "choose another --output_dir"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a directory: {hint}")
    missing = []
    parent = out
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output_dir {out} cannot be created: {parent} is a file, not a directory; {hint}")
    created = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            created.append(directory)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        where = f"{out} is not writable" if not missing else f"{out} cannot be created in {parent}"
        raise UserError(f"--output_dir {out}: {where} ({error.strerror}): {hint}, or fix the permissions") from None
    finally:
        for directory in reversed(created):
            directory.rmdir()


def _strings(value: Any, where: str):
    """(field path, string) of every string inside a JSON value."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key, where)
            yield from _strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")


def check_hotpot_data(spec: str | None, max_samples: int | None) -> int:
    """Read the records the pieces stage will use and check what the record checks of `data.hotpotqa` let through
    but would break later: JSON nested too deep to parse, strings that are not valid Unicode (a lone surrogate
    escape such as \\ud800), sentence indices too large to store, and `_id`s that repeat (piece ids are built from
    them). Returns the number of records checked."""
    from lit_coupling.data.hotpotqa import (
        HotpotDataError,
        normalize_record,
        parse_records,
        resolve_hotpot_data,
    )

    path, _ = resolve_hotpot_data(spec)
    try:
        raw, _ = parse_records(path)
    except RecursionError:
        raise HotpotDataError(
            f"{path}: JSON nested too deeply to parse; a HotpotQA record is a few levels deep "
            f"(a list of records, each with lists of [title, sentences]): check the file"
        ) from None
    except PermissionError as error:
        raise HotpotDataError(f"{path}: cannot be read ({error.strerror}): check its permissions") from None
    if max_samples is not None:
        raw = raw[:max_samples]
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        record = normalize_record(item, index, path)
        where = f"{path}: record {index} (_id {record['id']!r})"
        for field, text in _strings(item, ""):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise HotpotDataError(
                    f"{where}, field {field or '_id'!r}: holds {text[error.start]!r} at character {error.start}, "
                    f"half of a UTF-16 surrogate pair (a \\u escape without its partner), which is not a character; "
                    f"fix or remove that escape in the file"
                ) from None
        for i, sent_id in enumerate(record["supporting_facts"]["sent_id"]):
            if sent_id > MAX_SENT_ID:
                raise HotpotDataError(
                    f"{where}, field 'supporting_facts[{i}]': sent_id {sent_id} is not a "
                    f"sentence index (expected 0 ≤ sent_id ≤ {MAX_SENT_ID}, the position of a "
                    f"sentence in its paragraph)"
                )
        if record["id"] in seen:
            raise HotpotDataError(
                f"{where}: the same _id as record {seen[record['id']]}; every record needs its own "
                f"_id (knowledge pieces are named after it): remove the duplicate or give it "
                f"another _id"
            )
        seen[record["id"]] = index
    return len(raw)


def num_layers_of(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_layers(setting: str, spec, num_layers: int | None, model: str) -> None:
    """A layer setting resolves to existing layers of the model (no wrap-around, no backwards range)."""
    from lit_coupling.models.adapters import parse_layers

    if spec is None or num_layers is None:
        return
    try:
        parse_layers(spec, num_layers)
    except UserError as error:
        raise SettingError(
            f"--{setting} {spec!r} on {model} ({num_layers} layers, 0..{num_layers - 1}): {error}"
        ) from None


def check_model(cfg, stages: list[str]) -> None:
    """The model's config and tokenizer load, its layer count holds the layer settings, and its embedding holds
    every token id its tokenizer can produce."""
    from lit_coupling.models.loading import ModelLoadError, config_at, resolve_model_path, tokenizer_at

    resolved = resolve_model_path(cfg.model_path)
    config = config_at(resolved, cfg.trust_remote_code)
    num_layers = num_layers_of(config)
    if "gradsim" in stages:
        check_layers("layers", cfg.layers, num_layers, cfg.model_path)
    if "ripple" in stages:
        if cfg.memit.layers != "traced":  # traced: chosen by causal tracing once the model runs
            check_layers("memit.layers", cfg.memit.layers, num_layers, cfg.model_path)
        if (
            isinstance(cfg.memit.hparams, str)
            and cfg.memit.hparams != "auto"
            and cfg.memit.layers is None
            and num_layers
        ):
            from lit_coupling.editing.hparams import read_hparams_file

            layers = list(read_hparams_file(cfg.memit.hparams).layers)
            check_layers("memit.hparams", layers, num_layers, cfg.model_path)
    if "pieces" in stages:
        tokenizer = tokenizer_at(resolved, cfg.trust_remote_code)
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            raise ModelLoadError(
                f"{cfg.model_path}: its tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                f"{vocab} rows (vocab_size in its config): token ids ≥ {vocab} would index past it. Save the "
                f"tokenizer the model was trained with next to it, or resize the embedding "
                f"(model.resize_token_embeddings(len(tokenizer))) and save the model again."
            )


def check_inputs(cfg, stages: list[str]) -> None:
    """Everything the stages about to compute will open, opened and checked now."""
    if "pieces" in stages:
        check_hotpot_data(cfg.hotpot_data, cfg.max_samples)
    if any(s in stages for s in ("pieces", "gradsim", "ripple")):
        check_model(cfg, stages)
