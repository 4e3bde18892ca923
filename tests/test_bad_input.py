"""Bad input is refused before any work, with a message that names the setting, file, record or field.

Most cases call the parser and the checks directly (no model runs); a few build a tiny model directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lit_coupling.data.hotpotqa import HotpotDataError
from lit_coupling.errors import SettingError, UserError
from lit_coupling.pipeline.run import parse_config

RECORD = {
    "_id": "r0",
    "question": "Where was Marie Curie born?",
    "answer": "Warsaw",
    "type": "bridge",
    "level": "easy",
    "supporting_facts": [["Marie Curie", 0]],
    "context": [["Marie Curie", ["Marie Curie was born in Warsaw."]]],
}


def validated(*argv: str):
    cfg = parse_config(["--device", "cpu", *argv])
    cfg.validate()
    return cfg


# (argv, words the message must hold)
BAD_SETTINGS = [
    (["--max_experiments", "0"], ["--max_experiments 0", "≥ 1"]),
    (["--max_samples", "0"], ["--max_samples"]),
    (["--gradsim.batch_size", "0"], ["--gradsim.batch_size"]),
    (["--memit.batch_size", "-2"], ["--memit.batch_size"]),
    (["--seed", "-1"], ["--seed"]),
    (["--analysis.confidence", "1.5"], ["--analysis.confidence", "(0, 1)"]),
    (["--analysis.permutations=-3"], ["--analysis.permutations"]),
    (["--analysis.permutations", "10"], ["--analysis.permutations", "--analysis.alpha"]),
    (["--analysis.alpha=-0.1"], ["--analysis.alpha"]),
    (["--analysis.bootstrap", "0"], ["--analysis.bootstrap"]),
    (["--analysis.ripple_quantile", "0"], ["--analysis.ripple_quantile"]),
    (["--analysis.min_stratum_pairs", "1"], ["--analysis.min_stratum_pairs"]),
    (["--trainer.devices", "0"], ["--trainer.devices"]),
    (["--trainer.strategy", "deepspeed"], ["--trainer.strategy", "ddp"]),
    (["--trainer.num_nodes", "0"], ["--trainer.num_nodes"]),
    (["--trainer.accelerator", "tpu"], ["--trainer.accelerator"]),
    (["--device", "tpu"], ["--device 'tpu'", "cpu, cuda"]),
    (["--stages", ""], ["--stages"]),
    (["--stages", " , "], ["--stages"]),
    (["--stages", "pieces,nonsense"], ["nonsense", "--stages"]),
    (["--gradsim.exact_method", "foo"], ["--gradsim.exact_method", "ghost"]),
    (["--gradsim.mode", "fast"], ["--gradsim.mode"]),
    (["--gradsim.k_out", "0"], ["--gradsim.k_out"]),
    (["--gradsim.reduce_memory_gb", "0"], ["--gradsim.reduce_memory_gb"]),
    (["--memit.cov_tokens", "0"], ["--memit.cov_tokens", "corpus tokens"]),
    (["--memit.on_edit_error", "skip"], ["--memit.on_edit_error"]),
    (["--memit.hparams", "no/such.yaml"], ["--memit.hparams", "No such file"]),
    (["--memit.cov_corpus", "no/such.txt"], ["--memit.cov_corpus", "No such file"]),
    (["--memit.cov_corpus", "/"], ["--memit.cov_corpus", "a directory, not a file"]),
    (["--memit.stats_dir", "/dev/null"], ["--memit.stats_dir", "That is a file"]),
    (["--dtype", "float16"], ["--dtype", "underflow"]),
    (["--dtype", "int8"], ["--dtype"]),
    (["--layers", "3-1"], ["--layers", "backwards", "1-3"]),
    (["--layers", "four"], ["--layers"]),
    (["--memit.layers", "2-x"], ["--memit.layers"]),
    (["--target_pattern", "transformer.h.mlp"], ["--target_pattern", "{}"]),
    (["--model_path", ""], ["--model_path"]),
]


@pytest.mark.parametrize("argv,words", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_by_name(argv, words):
    with pytest.raises(SettingError) as error:
        validated(*argv)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_good_settings_pass():
    validated()
    validated(
        "--analysis.permutations",
        "20",
        "--analysis.bootstrap",
        "40",
        "--layers",
        "0-1,3",
        "--memit.layers=-2--1",
        "--trainer.devices",
        "auto",
    )


def test_no_gpu_refuses_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingError, match="--device 'cuda'.*no CUDA GPU"):
        validated("--device", "cuda")
    with pytest.raises(SettingError, match="--trainer.accelerator.*no CUDA GPU"):
        validated("--trainer.accelerator", "gpu")


def test_layer_ranges_do_not_wrap_around():
    from lit_coupling.models.adapters import AdapterError, parse_layers
    from lit_coupling.pipeline.preflight import check_layers

    assert parse_layers("2-3", 4) == [2, 3] and parse_layers("-2--1", 4) == [2, 3]
    for spec in ("4-5", "3-4", "-5-1"):
        with pytest.raises(AdapterError, match="out of range"):
            parse_layers(spec, 4)
    with pytest.raises(AdapterError, match="backwards"):
        parse_layers("3-1", 4)
    with pytest.raises(SettingError, match=r"--memit.layers '5-6' on m \(4 layers"):
        check_layers("memit.layers", "5-6", 4, "m")


def test_a_bad_config_file_is_named(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_experiments: [1, 2\n")
    with pytest.raises(SettingError, match=r"--config .*broken.yaml: not valid YAML at line 2"):
        parse_config(["--config", str(broken)])
    with pytest.raises(SettingError, match="no such file"):
        parse_config(["--config", str(tmp_path / "none.yaml")])
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(SettingError, match="expected a mapping"):
        parse_config(["--config", str(listed)])


def test_output_dir_that_cannot_be_written(tmp_path):
    from lit_coupling.pipeline.preflight import check_output_dir

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output_dir(a_file)
    with pytest.raises(UserError, match="a_file is a file"):
        check_output_dir(a_file / "run" / "deeper")
    with pytest.raises(UserError, match="--output_dir /proc/lit_coupling_run"):
        check_output_dir(Path("/proc/lit_coupling_run"))
    check_output_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind


def write_records(path: Path, records) -> str:
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return str(path)


def with_(**changes):
    record = json.loads(json.dumps(RECORD))
    record.update(changes)
    return record


@pytest.mark.parametrize(
    "records,words",
    [
        ([with_(supporting_facts=[["Marie Curie", 10**30]])], ["record 0", "'r0'", "supporting_facts[0]", "sent_id"]),
        (
            "[" + json.dumps(RECORD).replace('"Warsaw"', '"\\ud800Warsaw"', 1) + "]",
            ["record 0", "'answer'", "surrogate"],
        ),
        ("[" * 50000 + "]" * 50000, ["nested too deeply"]),
        ([RECORD, with_(question="Another?")], ["record 1", "same _id as record 0"]),
        ([with_(context="Marie Curie")], ["record 0", "'context'"]),
    ],
    ids=["huge sent_id", "lone surrogate", "deep nesting", "duplicate _id", "mistyped field"],
)
def test_hotpot_records_that_would_break_later_are_refused_up_front(tmp_path, records, words):
    from lit_coupling.pipeline.preflight import check_hotpot_data

    path = write_records(tmp_path / "data.json", records)
    with pytest.raises(HotpotDataError) as error:
        check_hotpot_data(path, None)
    assert "data.json" in str(error.value) and all(w in str(error.value) for w in words), str(error.value)


def test_a_directory_as_data_file(tmp_path):
    from lit_coupling.pipeline.manifest import data_identity
    from lit_coupling.pipeline.preflight import check_hotpot_data

    with pytest.raises(UserError, match="directory"):
        data_identity(str(tmp_path))
    with pytest.raises(HotpotDataError, match="directory"):
        check_hotpot_data(str(tmp_path), None)
    assert check_hotpot_data(write_records(tmp_path / "ok.json", [RECORD, with_(_id="r1")]), 1) == 1


def test_a_model_without_tokenizer_files_is_named_as_such(tiny_model_dir, tmp_path):
    from lit_coupling.models.loading import ModelLoadError, load_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir("gpt2") / name, bare / name)
    with pytest.raises(ModelLoadError, match="holds no tokenizer"):
        load_tokenizer(str(bare))


def test_nan_weights_are_blamed_on_the_checkpoint_not_bfloat16(tiny_model_dir, tmp_path):
    import safetensors.torch

    from lit_coupling.models.loading import ModelLoadError, load_model

    model = tmp_path / "nan"
    shutil.copytree(tiny_model_dir("gpt2"), model)
    weights = safetensors.torch.load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.c_proj.weight"))
    weights[name][0, 0] = float("nan")
    safetensors.torch.save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"{name} holds 1 NaN/inf.*float32") as error:
        load_model(str(model), dtype="float32", device="cpu")
    assert "bfloat16" not in str(error.value)


def test_a_tokenizer_larger_than_the_embedding(tiny_model_dir, tmp_path):
    from lit_coupling.models.loading import ModelLoadError
    from lit_coupling.pipeline.preflight import check_model

    model = tmp_path / "small"
    shutil.copytree(tiny_model_dir("gpt2"), model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 100
    (model / "config.json").write_text(json.dumps(config))
    cfg = parse_config(["--model_path", str(model)])
    with pytest.raises(ModelLoadError, match="embedding only 100 rows"):
        check_model(cfg, ["pieces"])


def test_the_top_level_handler(monkeypatch, capsys, tmp_path):
    """A user error is a message (exit 2); a bug is a message naming the log that holds its traceback (exit 1)."""
    from lit_coupling import __main__ as entry
    from lit_coupling.pipeline import run as run_module

    monkeypatch.setenv("LIT_COUPLING_CACHE", str(tmp_path))

    def bug(cfg):
        raise KeyError("oops")

    monkeypatch.setattr(run_module, "run", bug)
    assert entry.main(["run", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback" not in err
    log = next((tmp_path / "logs").glob("lit-coupling-run-*.log"))
    assert "KeyError: 'oops'" in log.read_text() and str(log) in err

    assert entry.main(["run", "--device", "cpu", "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err
    import os

    os.environ.pop("LIT_COUPLING_VERBOSE", None)  # --verbose passes itself on to DDP ranks through the environment

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run", interrupted)
    assert entry.main(["run"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert entry.main(["run", "--max_experiments", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max_experiments 0" in err and "Traceback" not in err
