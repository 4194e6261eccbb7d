"""SGLang plugin of sglang-cascade (entry point group `sglang.srt.plugins`, name `cascade`).

SGLang calls register() early in every process it starts (launcher, schedulers, detokenizer).
Always: EAGLE3 capture for SGLang's Mixtral (harmless, and needed by plain EAGLE3 runs too) and the
argv hook that recognises --cascade. Only where the launcher exported Cascade settings (--cascade
given): the batch-tier policy, the decode hook and the meta_info figures, checked before serving.
User guide: README.md in this folder.
"""


def register() -> None:
    from .registration import register_all

    register_all()
