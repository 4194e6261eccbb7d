"""What register() installs, and where (see the package docstring; the hooks: hooks.py)."""

from __future__ import annotations

import sys

from .flags import ENV_VAR, PluginSettings
from .hooks import HOOKS
from .log import announce


def register_all() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .mixtral_eagle3 import install_mixtral_eagle3
    from .selfcheck import version_problem

    # EAGLE3 on a Mixtral target needs the capture with or without --cascade; it subclasses SGLang's
    # Mixtral classes, so only on the SGLang version they were written for
    if version_problem() is None:
        install_mixtral_eagle3()
    for hook in HOOKS:
        if hook.always:
            HookRegistry.register(hook.target, hook.resolve(), getattr(HookType, hook.kind))
    settings = PluginSettings.from_environ()
    if settings is not None:
        _register_cascade(HookRegistry, HookType, settings)


def _register_cascade(registry, hook_type, settings: PluginSettings) -> None:
    """Hooks of a Cascade process: installed only if the installed SGLang passes the check, then
    applied and verified now, so a failure stops the process."""
    from .selfcheck import check_applied, check_installed

    problems = check_installed(settings.allow_untested_sglang)
    if not problems:
        for hook in HOOKS:
            if not hook.always:
                registry.register(hook.target, hook.resolve(), getattr(hook_type, hook.kind))
        registry.apply_hooks()   # idempotent; SGLang calls it again after all plugins ran
        problems = check_applied()
    if problems:
        print("sglang-cascade: error: refusing to start: " + "; ".join(problems) +
              f". Launch without --cascade (unset {ENV_VAR}) or install the supported SGLang", file=sys.stderr,
              flush=True)
        raise SystemExit(3)   # SystemExit passes SGLang's `except Exception` around plugins
    import sglang

    announce(f"plugin loaded, Cascade on (ladder {' '.join(c.label() for c in settings.cascade.ladder)}, "
             f"steps {list(settings.captured_steps)}); hooks verified against SGLang {sglang.__version__}")
