"""Callback hooks around runs, experiences, epochs, iterations and evaluation (Lightning-style).

Metrics, loggers, checkpoints and the event journal are all callbacks; the engine calls every hook
of every callback in list order. Callbacks with state implement ``state_dict``/``load_state_dict``
so a resumed run continues where it stopped.
"""

from __future__ import annotations

from typing import Any

from cl.errors import CheckpointError


class Callback:
    """Override any subset of the hooks; all default to doing nothing."""

    def before_run(self, agent: Any, stream: Any) -> None: ...
    def before_experience(self, agent: Any, exp: Any) -> None: ...
    def before_epoch(self, agent: Any, exp: Any, epoch: int) -> None: ...
    def before_iteration(self, agent: Any, iteration: int) -> None: ...
    def after_iteration(self, agent: Any, iteration: int, loss: float) -> None: ...
    def after_epoch(self, agent: Any, exp: Any, epoch: int, logs: dict[str, float]) -> None: ...
    def after_training(self, agent: Any, exp: Any) -> None: ...
    def before_eval(self, agent: Any, exps: list[Any]) -> None: ...
    def after_eval(self, agent: Any, exps: list[Any], results: dict[str, Any]) -> None: ...
    def after_experience(self, agent: Any, exp: Any) -> None: ...
    def after_run(self, agent: Any) -> None: ...
    def on_event(self, agent: Any, kind: str, data: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


HOOKS = [n for n in vars(Callback) if n.startswith(("before_", "after_", "on_"))]


class CallbackList(Callback):
    """Dispatches each hook to a list of callbacks, in order."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def __getattribute__(self, name: str) -> Any:
        if name in HOOKS:
            cbs = object.__getattribute__(self, "callbacks")

            def dispatch(*args: Any, **kwargs: Any) -> None:
                for cb in cbs:
                    getattr(cb, name)(*args, **kwargs)

            return dispatch
        return object.__getattribute__(self, name)

    def append(self, cb: Callback) -> None:
        self.callbacks.append(cb)

    def find(self, cls: type) -> Any:
        """The first callback of type ``cls``, or None."""
        return next((c for c in self.callbacks if isinstance(c, cls)), None)

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}:{type(c).__name__}": c.state_dict() for i, c in enumerate(self.callbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each callback its saved state; a state that does not fit raises CheckpointError."""
        for i, c in enumerate(self.callbacks):
            key = f"{i}:{type(c).__name__}"
            if key in state:
                try:
                    c.load_state_dict(state[key])
                except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                    raise CheckpointError(f"the saved state of callback {key} does not fit it "
                                          f"({type(e).__name__}: {e})") from None
