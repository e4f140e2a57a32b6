"""The task this plugin adds to every app that uses it: ``celery_perkey_backend.sweep``.

It is registered when the backend is built, and, for ``celery worker``, when Celery's
loader imports the app's modules (our CLI entry point module connects that signal), so a
worker configured only through ``result_backend`` knows it before it consumes anything.
"""

from __future__ import annotations

from typing import Any

from celery import signals

__all__ = ["SWEEP_TASK", "register_sweep_task", "uses_perkey"]

SWEEP_TASK = "celery_perkey_backend.sweep"


def register_sweep_task(app: Any) -> None:
    """Add the sweep task to ``app`` unless it is there already."""
    # A mark on the app, not a look at app.tasks: that would finalize the app.
    if getattr(app, "_perkey_sweep_registered", False):
        return
    app._perkey_sweep_registered = True

    @app.task(name=SWEEP_TASK, shared=False, bind=True)  # type: ignore[untyped-decorator]
    def sweep_task(self: Any, **options: Any) -> dict[str, Any]:
        """Sweep the result keys; takes any sweep option, e.g. ``dry_run=True``."""
        summary: dict[str, Any] = self.app.backend.run_sweep(**options).as_dict()
        return summary


def uses_perkey(app: Any) -> bool:
    backend = app.conf.result_backend or ""
    return isinstance(backend, str) and backend.split("://")[0].split("+")[0] == "perkey"


@signals.import_modules.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_import_modules(sender: Any = None, **kwargs: Any) -> None:
    if sender is not None and uses_perkey(sender):
        register_sweep_task(sender)
