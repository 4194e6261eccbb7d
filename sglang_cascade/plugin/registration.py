"""What register() installs, and where (see the package docstring)."""

from __future__ import annotations

import sys

from .flags import ENV_VAR, SUPPORTED_SGLANG, PluginSettings
from .log import announce


def register_all() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .argv_hook import prepare_server_args_hook
    from .meta_info import update_request_meta_info_hook
    from .mixtral_eagle3 import install_mixtral_eagle3

    install_mixtral_eagle3()
    HookRegistry.register("sglang.srt.server_args.prepare_server_args", prepare_server_args_hook, HookType.AROUND)
    # inert without Cascade: it acts only on the 'cascade' key, which only Cascade schedulers emit
    HookRegistry.register("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
                          update_request_meta_info_hook, HookType.AROUND)
    settings = PluginSettings.from_environ()
    if settings is not None:
        _register_cascade(HookRegistry, HookType, settings)


def _register_cascade(registry, hook_type, settings: PluginSettings) -> None:
    """Hooks of a Cascade process; applied and verified now, so a failure stops the process."""
    from .batch_tier import CascadeStepsPolicy, forward_batch_generation_hook, verify_hook
    from .draft_compile import select_top_k_later_hook
    from .meta_info import get_output_streamer_class_hook
    from .one_token_verify import forward_extend_hook
    from .pruned_experts import topk_forward_hook
    from .selfcheck import check_applied, check_signatures

    problems = check_signatures()
    if not problems:
        registry.register("sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams",
                          CascadeStepsPolicy, hook_type.REPLACE)
        registry.register("sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.forward_batch_generation",
                          forward_batch_generation_hook, hook_type.AROUND)
        registry.register("sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.verify", verify_hook,
                          hook_type.AROUND)
        registry.register("sglang.srt.layers.moe.topk.TopK.forward", topk_forward_hook, hook_type.AROUND)
        registry.register("sglang.srt.speculative.spec_utils._select_top_k_tokens_later", select_top_k_later_hook,
                          hook_type.AROUND)
        registry.register("sglang.srt.layers.attention.intel_amx_backend.IntelAMXAttnBackend.forward_extend",
                          forward_extend_hook, hook_type.AROUND)
        registry.register("sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class",
                          get_output_streamer_class_hook, hook_type.AROUND)
        registry.apply_hooks()   # idempotent; SGLang calls it again after all plugins ran
        problems = check_applied()
    if problems:
        import sglang

        print(f"sglang-cascade: error: refusing to start: this plugin supports SGLang {SUPPORTED_SGLANG}, found "
              f"SGLang {sglang.__version__}: " + "; ".join(problems) +
              f". Install sglang=={SUPPORTED_SGLANG}, or launch without --cascade "
              f"(unset {ENV_VAR})", file=sys.stderr, flush=True)
        raise SystemExit(3)   # SystemExit passes SGLang's `except Exception` around plugins
    announce(f"plugin loaded, Cascade on (ladder {' '.join(c.label() for c in settings.cascade.ladder)}, "
             f"steps {list(settings.captured_steps)}); hooks verified against SGLang {SUPPORTED_SGLANG}")
