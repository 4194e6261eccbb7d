"""Per-request Cascade figures in the response's `meta_info["cascade"]`.

The figures live in the scheduler, meta_info is built in the tokenizer manager (another process).
SGLang's extension route for that is "customized info": a SchedulerOutputStreamer subclass
(chosen by `Scheduler.get_output_streamer_class`, AROUND-hooked here) attaches per-request values
to each output batch, the detokenizer passes them through, and
`TokenizerManager.update_request_meta_info` puts them into meta_info. SGLang accumulates such
values into a growing list; the AROUND hook on that method keeps only the latest snapshot instead,
so meta_info["cascade"] is one dict (current config, its history, utility estimates, drafts
proposed and accepted as the plugin counts them).
"""

from __future__ import annotations

from functools import lru_cache

from .runtime import get_runtime

KEY = "cascade"


def get_output_streamer_class_hook(original, scheduler):
    return _with_cascade_figures(original(scheduler))


@lru_cache(maxsize=None)
def _with_cascade_figures(base: type) -> type:
    def build_additional_customized_info(self, reqs):
        extra = base.build_additional_customized_info(self, reqs)
        runtime = get_runtime()
        if runtime is None:
            return extra
        values = []
        for req in reqs:
            values.append([runtime.snapshot(req.rid)])
            if req.finished():
                runtime.finish(req.rid)
        return {**extra, KEY: values}

    def is_request_level_customized_info_key(self, key):
        return key == KEY or base.is_request_level_customized_info_key(self, key)

    return type(f"Cascade{base.__name__}", (base,), {
        "__slots__": (), "__doc__": f"{base.__name__} that adds meta_info['{KEY}'] per request.",
        "has_additional_customized_info": True,
        "build_additional_customized_info": build_additional_customized_info,
        "is_request_level_customized_info_key": is_request_level_customized_info_key,
    })


def update_request_meta_info_hook(original, manager, meta_info, state, customized_info, index, finish_reason):
    """meta_info['cascade'] = the latest snapshot (SGLang's default would append every snapshot)."""
    if KEY in customized_info:
        snapshot = customized_info[KEY][index]
        if snapshot and snapshot[-1] is not None:
            meta_info[KEY] = snapshot[-1]
        customized_info = {k: v for k, v in customized_info.items() if k != KEY}
    if customized_info:
        original(manager, meta_info, state, customized_info, index, finish_reason)
