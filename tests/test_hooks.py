"""The one hook helper: hooks run, edit outputs, stop the forward, and are always removed."""

import pytest
import torch
from torch import nn

from lit_coupling.models.hooks import Hooks, StopForward


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 2)
        self.ran: list[str] = []

    def forward(self, x, scale=1.0):
        for i, layer in enumerate(self.layers):
            self.ran.append(f"layers.{i}")
            x = layer(x) * scale
        self.ran.append("head")
        return self.head(x)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_forward_hook_sees_and_edits_the_output():
    model, x = Stack(), torch.randn(2, 4)
    seen = {}

    def capture(_m, args, output):
        seen["in"], seen["out"] = args[0], output

    def zero(_m, _args, output):
        return torch.zeros_like(output)

    with Hooks(forward=[(model.layers[0], capture), (model.layers[1], zero)]):
        got = model(x)
    assert torch.equal(seen["in"], x)
    assert torch.allclose(seen["out"], model.layers[0](x))
    # layer 1's output replaced by zeros: what follows is layer 2 and the head on zeros
    assert torch.allclose(got, model.head(model.layers[2](torch.zeros(2, 4))))
    assert no_hooks(model)
    assert torch.allclose(model(x), model.head(model.layers[2](model.layers[1](model.layers[0](x)))))


def test_stop_after_ends_the_forward_and_the_block_goes_on():
    model, x = Stack(), torch.randn(2, 4)
    seen = {}
    hooks = Hooks(forward=[(model.layers[1], lambda _m, _a, out: seen.update(h=out))], stop_after=model.layers[1])
    with hooks:
        model(x)
        pytest.fail("the forward should have stopped")  # never reached: the stop leaves the block here
    assert hooks.stopped
    assert model.ran == ["layers.0", "layers.1"]  # layer 2 and the head never ran
    assert torch.allclose(seen["h"], model.layers[1](model.layers[0](x)))  # the hook ran before the stop
    assert no_hooks(model)


def test_a_hook_may_stop_before_a_module_runs():
    model = Stack()

    def stop(_m, _args):
        raise StopForward

    with Hooks(pre=[(model.layers[0], stop)]) as hooks:
        model(torch.randn(1, 4))
    assert hooks.stopped and model.ran == ["layers.0"]  # the pre hook of layers.0 stopped it: no Linear ran
    assert no_hooks(model)


def test_without_a_stop_nothing_is_swallowed_and_hooks_go_on_errors():
    model = Stack()

    def boom(_m, _a, _o):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with Hooks(forward=[(model.layers[2], boom)]):
            model(torch.randn(1, 4))
    assert no_hooks(model)
    with Hooks(forward=[(model.layers[2], lambda *_: None)]) as hooks:
        model(torch.randn(1, 4))
    assert not hooks.stopped and model.ran[-1] == "head"


def test_named_modules_pre_hooks_with_kwargs_and_replacement_args():
    model, x = Stack(), torch.randn(2, 4)
    calls = []

    def pre(_m, args, kwargs):
        calls.append(kwargs)
        return (args[0] * 0,), kwargs  # replace the input

    with Hooks(pre=[("layers.2", pre)], root=model, pre_kwargs=True):
        got = model(x)
    assert calls == [{}]
    assert torch.allclose(got, model.head(model.layers[2](torch.zeros(2, 4))))
    with pytest.raises(ValueError, match="root"):
        Hooks(forward=[("layers.0", lambda *_: None)])


def test_attach_and_remove_hold_hooks_across_calls_without_doubling():
    model, count = Stack(), {"n": 0}
    hooks = Hooks(forward=[(model.layers[0], lambda *_: count.update(n=count["n"] + 1))])
    hooks.attach()
    hooks.attach()  # re-attaching replaces, never doubles
    model(torch.randn(1, 4))
    model(torch.randn(1, 4))
    assert count["n"] == 2
    hooks.remove()
    model(torch.randn(1, 4))
    assert count["n"] == 2 and no_hooks(model)


def test_stop_in_a_nested_block_is_caught_by_the_innermost():
    model = Stack()
    outer = Hooks(forward=[(model.layers[0], lambda *_: None)])
    inner = Hooks(stop_after=model.layers[0])
    with outer:
        with inner:
            model(torch.randn(1, 4))
        after = model(torch.randn(1, 4))  # the outer hooks are still on, the stop is gone
    assert inner.stopped and not outer.stopped
    assert after.shape == (1, 2)
    assert no_hooks(model)
