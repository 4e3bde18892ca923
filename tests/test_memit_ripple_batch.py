"""The ripple stage with batch_size_edits B > 1 (#19): B requests are one MEMIT edit; every record of a batch holds
the joint ripple, which equals scoring the pieces after apply_memit of the same requests at once; the weights come
back bit for bit; B = 1 gives the default's files."""

import json

import pytest
import torch

from lit_coupling.data.piece import load_pieces
from lit_coupling.editing.callbacks import RippleWriter
from lit_coupling.editing.memit import apply_memit
from lit_coupling.editing.ripple import score_pieces
from lit_coupling.editing.snapshot import restored_after, state_checksum
from lit_coupling.outputs import RIPPLE, RIPPLE_PAIRS
from lit_coupling.trainer import build_trainer
from tests.test_memit_ripple import EDITS, fresh_run, module_and_data, one_thread, reference_checksum, world  # noqa: F401


def _run(world, name, **kwargs):  # noqa: F811
    out = fresh_run(world, name)
    module, data = module_and_data(world, out, **kwargs)
    writer = RippleWriter(str(out))
    build_trainer(device="cpu", callbacks=[writer], enable_progress_bar=False).predict(
        module, datamodule=data, return_predictions=False
    )
    return out, module, data


def test_a_batch_of_edits_is_one_memit_edit_with_a_joint_ripple(world):  # noqa: F811
    out, module, data = _run(world, "batch2", batch_size_edits=2)
    assert state_checksum(module.lm) == reference_checksum(world)
    doc = json.loads((out / RIPPLE).read_text())
    experiments = doc["experiments"]
    assert [e["edit_id"] for e in experiments] == list(range(EDITS))
    pieces, _ = load_pieces(out)
    for first in range(0, EDITS, 2):
        pair = experiments[first : first + 2]
        assert all(e["status"] == "ok" for e in pair)
        assert [e["memit"]["batch"] for e in pair] == [{"size": 2, "edit_ids": [first, first + 1]}] * 2
        assert pair[0]["pieces"]["logp_after"] == pair[1]["pieces"]["logp_after"]
        # the same requests edited at once by hand give the same after-scores
        requests = [r for r in data.plan.requests if r.edit_id in (first, first + 1)]
        with restored_after(module.edited_weights()):
            result = apply_memit(
                module.adapter,
                module.tokenizer,
                requests,
                module.memit_hparams,
                module.solvers,
                module.prefixes,
                module.bos,
                module.pad_id,
            )
            after = score_pieces(module.lm, module.tokenizer, pieces, 32, module.pad_id)
        assert pair[0]["pieces"]["logp_after"] == pytest.approx(after.logp, abs=1e-4)
        for layer, (u, v) in result.updates.items():
            saved_u, saved_v = module.updates[first][layer]
            assert saved_u.shape[1] == 2 and module.updates[first + 1][layer][0] is saved_u
            assert torch.allclose(saved_u @ saved_v.T, (u @ v.T).float(), rtol=1e-4, atol=1e-6)
        for e in pair:  # each request's own probes: its efficacy, of its own prompt
            assert e["efficacy"]["logp_new_after"] > e["efficacy"]["logp_new_before"]


def test_batch_size_one_is_the_default(world):  # noqa: F811
    default, _, _ = _run(world, "default-b")
    one, _, _ = _run(world, "b1", batch_size_edits=1)
    a, b = json.loads((default / RIPPLE).read_text()), json.loads((one / RIPPLE).read_text())
    for e in (*a["experiments"], *b["experiments"]):
        e["time_s"] = None
    assert a["experiments"] == b["experiments"]
    assert (default / RIPPLE_PAIRS).read_text() == (one / RIPPLE_PAIRS).read_text()
