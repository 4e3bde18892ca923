"""Hooks on modules for one forward (or for as long as a caller holds them), removed however the forward ends.

`Hooks` is the one place lit_coupling registers forward hooks and forward-pre hooks, in the spirit of memit's
`TraceDict` (baukit): give it (module, function) pairs — a module or its dotted name under `root` — and use it as a
context manager. A forward hook may return a replacement output (an edit of the module's output), a pre hook
replacement arguments, exactly as in `torch.nn.Module.register_forward_hook`. With `stop_after`, the forward is cut
short once that module has run: a hook raises `StopForward`, and the `with` block swallows it, so the later layers
and the LM head never run. Any hook may raise `StopForward` itself to stop earlier (before a module runs, from a pre
hook). The hooks are removed on leaving the block, on an error as well.

    with Hooks(forward=[(block, capture)], stop_after=block):
        model(input_ids=ids)          # stops after `block`; the code after the `with` runs as usual

`attach()` / `remove()` hold hooks across calls (Lightning's `on_predict_start` / `on_predict_end`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["Hooks", "StopForward"]

ModuleRef = nn.Module | str
HookPairs = Iterable[tuple[ModuleRef, Callable]]


class StopForward(Exception):
    """Raised from a hook once everything needed is captured; the enclosing `with Hooks(...)` block swallows it."""


class Hooks:
    """Forward hooks and forward-pre hooks on modules, registered on entering and removed on leaving.

    Args:
        forward: (module, fn) pairs; fn(module, args, output) → None, or a replacement output.
        pre: (module, fn) pairs; fn(module, args) → None, or replacement args. With `pre_kwargs`,
            fn(module, args, kwargs) → None or (args, kwargs), as `register_forward_pre_hook(with_kwargs=True)`.
        stop_after: a module after whose forward (and its hooks here) the forward stops with `StopForward`.
        root: the model that dotted module names are looked up in.
        pre_kwargs: the pre hooks take the call's keyword arguments too.

    Hooks run in the order given (forward hooks before the stop); `stopped` says whether the last forward inside
    the block was cut short.
    """

    def __init__(
        self,
        forward: HookPairs = (),
        pre: HookPairs = (),
        stop_after: ModuleRef | None = None,
        root: nn.Module | None = None,
        pre_kwargs: bool = False,
    ):
        self.root = root
        self.forward = [(self._module(m), fn) for m, fn in forward]
        self.pre = [(self._module(m), fn) for m, fn in pre]
        self.stop_after = self._module(stop_after) if stop_after is not None else None
        self.pre_kwargs = pre_kwargs
        self.stopped = False
        self._handles: list = []

    def _module(self, ref: ModuleRef) -> nn.Module:
        if isinstance(ref, nn.Module):
            return ref
        if self.root is None:
            raise ValueError(f"module {ref!r} is named: give Hooks the model it lives in as root=")
        return self.root.get_submodule(ref)

    @staticmethod
    def _stop(_module, _args, _output):
        raise StopForward

    def attach(self) -> Hooks:
        """Register every hook (removing any this object registered before)."""
        self.remove()
        self.stopped = False
        try:
            for module, fn in self.pre:
                self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=self.pre_kwargs))
            for module, fn in self.forward:
                self._handles.append(module.register_forward_hook(fn))
            if self.stop_after is not None:
                self._handles.append(self.stop_after.register_forward_hook(self._stop))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Hooks:
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        if exc_type is not None and issubclass(exc_type, StopForward):
            self.stopped = True
            return True
        return False
