"""Greedy speculative output is token-identical to plain decoding, batched, for every mode."""

import pytest
import torch
from tiny_models import VOCAB

from sglang_cascade.controller import CascadeConfig, SpecConfig
from sglang_cascade.engine import Engine, EngineConfig, GenerationRequest, SamplingParams


def generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int = 24, **sampling):
    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", ids, SamplingParams(max_new_tokens=max_new_tokens, **sampling)))
    outs, meta = {}, {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
            meta[o.rid] = o.meta
    return [outs[f"r{i}"] for i in range(len(prompts))], [meta[f"r{i}"] for i in range(len(prompts))]


def tiny_engine(pair, mode, static=None, **kw):
    model, head = pair
    return Engine(EngineConfig(mode=mode, static_config=static, max_batch=4, max_context=256, **kw),
                  model=model, head=head)


PROMPTS = [torch.randint(0, VOCAB, (3 + i % 5,), generator=torch.Generator().manual_seed(i)).tolist()
           for i in range(10)]


@pytest.fixture(scope="module")
def plain_outputs(tiny_pair):
    return generate(tiny_engine(tiny_pair, "plain"), PROMPTS)[0]


@pytest.mark.parametrize("config", ["1x1x2", "3x1x4", "5x1x6", "3x2x6", "4x4x12"])
def test_static_configs_match_plain(tiny_pair, plain_outputs, config):
    outs, meta = generate(tiny_engine(tiny_pair, "static", SpecConfig.parse(config)), PROMPTS)
    assert outs == plain_outputs
    assert sum(m["spec_accepted_drafts"] for m in meta) > 0     # drafts were really accepted


def test_cascade_matches_plain(tiny_pair, plain_outputs):
    # every request tests from scratch (no shared prior, whose back-off can keep a request plain
    # throughout), so each one switches configurations mid-generation
    cascade = CascadeConfig(candidates="0,1x1x2,3x1x4,3x2x6", warmup_iters=1, trial_iters=2, set_iters=4,
                            prior_samples=0)
    outs, meta = generate(tiny_engine(tiny_pair, "cascade", cascade=cascade), PROMPTS)
    assert outs == plain_outputs
    assert all(len(m["cascade"]["config_history"]) >= 2 for m in meta)   # configurations changed


def test_mixed_per_request_configs_match_plain(tiny_pair, plain_outputs):
    """Each request's own `spec` runs (its label, tree size and chain depth in the meta and the
    iteration log), beside requests on the engine's static config, and output stays plain's."""
    engine = tiny_engine(tiny_pair, "static", SpecConfig.parse("4x2x8"))
    default = engine.cfg.static_config
    specs = {}
    for i, ids in enumerate(PROMPTS):
        spec = [SpecConfig(0), SpecConfig.parse("2x1x3"), SpecConfig.parse("3x2x6"), None][i % 4]
        specs[f"r{i}"] = spec or default
        engine.add_request(GenerationRequest(f"r{i}", ids, SamplingParams(max_new_tokens=24), spec=spec))
    outs, meta, longest = {}, {}, {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
            meta[o.rid] = o.meta
            longest[o.rid] = max(longest.get(o.rid, 0), len(o.new_token_ids))
    assert [outs[f"r{i}"] for i in range(len(PROMPTS))] == plain_outputs
    ran = {}   # rid -> {(config label, tree size)} over every verify the iteration log records
    for it in engine.iteration_log:
        for rid, label, size in zip(it["rids"], it["configs"], it["tree_sizes"]):
            ran.setdefault(rid, set()).add((label, size))
    for rid, spec in specs.items():
        m = meta[rid]
        assert m["spec_config"] == spec.label(), (rid, m)
        assert ran[rid] == {(spec.label(), spec.draft_tokens)}, (rid, ran[rid])
        assert m["spec_share_speculating"] == (1.0 if spec.speculative else 0.0), (rid, m)
        # a verify accepts at most the config's steps, and emits those plus the bonus token
        assert m["spec_accepted_drafts"] <= spec.steps * m["spec_verify_ct"], (rid, m)
        assert longest[rid] <= spec.steps + 1, (rid, longest[rid])
    chains = [rid for rid, spec in specs.items() if spec == SpecConfig.parse("2x1x3")]
    assert sum(meta[rid]["spec_accepted_drafts"] for rid in chains) > 0   # its drafts were accepted
    assert max(longest[rid] for rid in chains) == 3                     # to its full depth


def test_bad_requests_are_refused_with_the_fix(tiny_pair):
    engine = tiny_engine(tiny_pair, "plain")
    cases = [
        (GenerationRequest("a", []), "empty prompt"),
        (GenerationRequest("b", [1, 2], SamplingParams(max_new_tokens=300)), "context length"),
        (GenerationRequest("c", [1, VOCAB + 5]), "outside the vocabulary"),
        (GenerationRequest("d", [1], SamplingParams(temperature=-1)), "temperature"),
        (GenerationRequest("e", [1], spec=SpecConfig.parse("3x1x4")), "plain"),
    ]
    for req, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add_request(req)
    assert not engine.has_work()


def test_pinned_request_is_kept_out_of_the_policy(tiny_pair):
    """A request's own configuration runs, and the policy keeps no state for it: otherwise Cascade would
    book that request's speculative iterations to the rung it chose (a plain rung: its plain cost)."""
    engine = tiny_engine(tiny_pair, "cascade")
    pinned = SpecConfig.parse("3x1x4")
    engine.add_request(GenerationRequest("pinned", PROMPTS[0], SamplingParams(max_new_tokens=16), spec=pinned))
    engine.add_request(GenerationRequest("free", PROMPTS[1], SamplingParams(max_new_tokens=16)))
    metas = {}
    while engine.has_work():
        for out in engine.step():
            metas[out.rid] = out.meta
            with pytest.raises(KeyError):
                engine.controller.request_stats("pinned")
    assert metas["pinned"]["spec_config"] == pinned.label() and "cascade" not in metas["pinned"]
    assert metas["pinned"]["spec_share_speculating"] == 1.0
    assert "cascade" in metas["free"]
