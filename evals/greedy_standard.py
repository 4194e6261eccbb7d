"""Greedy equality for SGLang's bf16 CPU server, judged by a bound measured in the same run.

Why a bound at all: SGLang's CPU attention kernels run bf16 only, a verify pass runs the extend
kernel where plain decoding runs the decode kernel, and batch composition changes how GEMMs block
their rows, so logits move in their last bits and a greedy token may flip where the target's top
two logits nearly tie. How far they move depends on the CPU's kernels (AVX2, AVX-512, AMX): a
bound measured on one machine does not carry to another. So the bound is measured in the run that
uses it, from the no-speculation server's own variability.

The standard, over the whole output, not only its first divergence:
1. Score: the no-speculation server scores an output teacher-forced, in one prefill of prompt +
   output: a token's gap is how many nats it lies below the server's best token at its position,
   given the output's own prefix. A correct output has gaps near 0 everywhere; a token that the
   target would not have produced there (an acceptance or routing error, a skipped or repeated
   token) has a large gap at its position, wherever in the output it lies.
2. Bound: the largest gap among outputs the no-speculation server produced itself (each prompt
   alone, and the prompts batched in groups of two sizes), scored the same way: what numerics
   alone move on this machine, prefill against decode included.
3. Verdict: an output passes if every token's gap is within the bound.
Each output is scored alone, in a request of its own, so scoring one sequence is deterministic and
the same for every output it judges.
"""

from __future__ import annotations

from typing import Callable

Post = Callable[[str, dict], dict]   # post(path, json body) -> json answer, against the reference server


def gaps(post: Post, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    """Per output token: nats below the reference's best token there, teacher-forced on the output."""
    if not output_ids:
        return []
    start = len(prompt_ids)
    # SGLang scores input tokens from logprob_start_len on, the first of them without a logprob (its
    # context is taken to start there): so start one token early, at the prompt's last token
    answer = post("/generate", {"input_ids": list(prompt_ids) + list(output_ids),
                                "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                                "return_logprob": True, "logprob_start_len": start - 1, "top_logprobs_num": 1})
    meta = answer["meta_info"]
    chosen, best = meta["input_token_logprobs"][1:], meta["input_top_logprobs"][1:]
    if len(chosen) != len(output_ids) or any(c[0] is None for c in chosen):
        raise ValueError(f"the server scored {len(chosen)} of {len(output_ids)} output tokens with a logprob: "
                         f"its logprob_start_len semantics differ from SGLang 0.5.23's")
    out = []
    for (logprob, token, _), top, expected in zip(chosen, best, output_ids):
        if token != expected:
            raise ValueError(f"scored token {token} where the output has {expected}")
        out.append(max(0.0, round(top[0][0] - logprob, 4)))
    return out


def worst(post: Post, prompts: list[list[int]], outputs: list[list[int]]) -> list[float]:
    """Each output's largest gap (0 for an empty output)."""
    return [max(gaps(post, p, o), default=0.0) for p, o in zip(prompts, outputs)]


def bound(post: Post, prompts: list[list[int]], reference_variants: list[list[list[int]]]) -> float:
    """The largest gap among the no-speculation server's own outputs (each variant: one output per
    prompt, e.g. decoded alone, batched by 4, batched all together)."""
    seen = {}
    for variant in reference_variants:
        for i, (p, o) in enumerate(zip(prompts, variant)):
            key = (i, tuple(o))
            if key not in seen:   # the same output scores the same: score it once
                seen[key] = max(gaps(post, p, o), default=0.0)
    return max(seen.values(), default=0.0)


def judge(post: Post, prompts: list[list[int]], reference: list[list[int]], outputs: list[list[int]],
          limit: float) -> dict:
    """The verdict on outputs against the reference's own outputs (alone) and the bound."""
    worst_gaps = worst(post, prompts, outputs)
    identical = sum(a == b for a, b in zip(reference, outputs))
    beyond = [(i, g) for i, g in enumerate(worst_gaps) if g > limit]
    return {"prompts": len(outputs), "identical": identical, "bound": limit, "worst_gaps": worst_gaps,
            "beyond_bound": beyond, "passed": not beyond}
