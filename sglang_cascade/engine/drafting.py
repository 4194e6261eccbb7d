"""EAGLE tree drafting for a batch of requests, each with its own (steps, topk, draft_tokens).

The head's KV slot j - 1 holds the pair (target feature of token j - 1, token j). Before drafting, a
request catches up on the pairs it has not fed yet: all of them at once, so a request that ran
plain decoding for a while pays for its draft state only when it speculates again (SGLang instead
runs the draft extend every iteration, even at steps 0). Then, level by level (EAGLE-2's dynamic
tree): every frontier node proposes `topk` children, the `topk` best children by cumulative
log-probability form the next frontier, and the best `draft_tokens - 1` nodes of all proposed
become the tree the target verifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sglang_cascade.drafters.eagle3 import Eagle3DraftHead
from sglang_cascade.controller.types import SpecConfig
from sglang_cascade.engine.kv_cache import DraftKV, RequestCache
from sglang_cascade.engine.tree import DraftTree


@dataclass
class _Rows:
    """A request's rows in one head forward: slots [slot, slot + n), attending to committed slots
    [0, committed) and to the new rows' slots allowed by `mask` ([n, slot + n - committed])."""

    kv: DraftKV
    slot: int
    committed: int
    mask: torch.Tensor


@dataclass
class _Candidate:
    token: int
    parent: int          # index into the candidate list, -1 = root
    score: float
    depth: int


@dataclass
class DraftJob:
    """One request's drafting input: its caches, its tokens so far (the last one is the root, whose
    position is `cache.target.cached`) and its configuration."""

    cache: RequestCache
    tokens: list[int]
    config: SpecConfig
    candidates: list[_Candidate] = field(default_factory=list)
    expanded: list[int] = field(default_factory=list)    # candidates run through the head, in slot order


class TreeDrafter:
    def __init__(self, head: Eagle3DraftHead, embed_tokens: torch.nn.Embedding, capacity: int):
        self.head = head.eval()
        self.embed_tokens = embed_tokens
        self.device = head.d2t.device        # the target's device; the head itself runs float32
        self.capacity = capacity
        c = head.config
        self.num_kv_heads, self.head_dim = c.num_key_value_heads, c.head_dim
        self.groups = c.num_attention_heads // c.num_key_value_heads
        self.scale = c.head_dim ** -0.5

    def new_cache(self) -> DraftKV:
        return DraftKV(self.num_kv_heads, self.head_dim, self.capacity, device=self.device)

    @torch.no_grad()
    def draft(self, jobs: list[DraftJob]) -> list[DraftTree]:
        hidden = self._catch_up(jobs)
        frontier = [[(-1, h)] for h in hidden]          # per job: (candidate index, output hidden)
        max_steps = max(j.config.steps for j in jobs)
        for level in range(max_steps):
            live = [i for i, j in enumerate(jobs) if j.config.steps > level]
            expand = []
            for i in live:
                job = jobs[i]
                parents = [idx for idx, _ in frontier[i]]
                h = torch.stack([hid for _, hid in frontier[i]])
                logp = torch.log_softmax(self.head.logits(h).float(), dim=-1)
                top_lp, top_ids = torch.topk(logp, job.config.topk, dim=-1)
                top_tok = self.head.to_target_ids(top_ids).tolist()
                new = []
                for row, parent in enumerate(parents):
                    base = job.candidates[parent].score if parent >= 0 else 0.0
                    for lp, tok in zip(top_lp[row].tolist(), top_tok[row]):
                        job.candidates.append(_Candidate(tok, parent, base + lp, level + 1))
                        new.append((len(job.candidates) - 1, frontier[i][row][1]))
                new.sort(key=lambda c: -job.candidates[c[0]].score)
                frontier[i] = new[:job.config.topk]
                if level + 1 < job.config.steps:
                    expand.append(i)
            if expand:
                outs = self._expand(jobs, [frontier[i] for i in expand], expand)
                for i, h in zip(expand, outs):
                    frontier[i] = [(idx, row) for (idx, _), row in zip(frontier[i], h)]
        return [self._select(job) for job in jobs]

    def _catch_up(self, jobs: list[DraftJob]) -> list[torch.Tensor]:
        """Feed every pair not yet in the head's cache, up to the root; returns the root's hidden."""
        embeds, feats, positions, rows = [], [], [], []
        for job in jobs:
            kv, root_pos = job.cache.draft, job.cache.target.cached
            first = kv.filled + 1                       # first position not fed yet
            pos = torch.arange(first, root_pos + 1, device=self.device)
            embeds.append(self._embed(job.tokens[first:root_pos + 1]))
            feats.append(job.cache.features[first - 1:root_pos])
            positions.append(pos)
            n = len(pos)
            causal = torch.ones((n, n), dtype=torch.bool, device=self.device).tril()
            rows.append(_Rows(kv, kv.filled, kv.filled, causal))
            kv.filled = root_pos
        out = self._forward(torch.cat(embeds), torch.cat(feats), torch.cat(positions), rows)
        ends = torch.tensor([len(p) for p in positions], device=self.device).cumsum(0) - 1
        return list(out[ends])

    def _expand(self, jobs, frontiers, which) -> list[torch.Tensor]:
        """Run the head on frontier nodes (scratch slots after the committed ones)."""
        embeds, feats, positions, rows = [], [], [], []
        for i, nodes in zip(which, frontiers):
            job = jobs[i]
            kv = job.cache.draft
            expanded = job.expanded
            tokens = [job.candidates[idx].token for idx, _ in nodes]
            embeds.append(self._embed(tokens))
            feats.append(torch.stack([h for _, h in nodes]))
            positions.append(torch.tensor([kv.filled + job.candidates[idx].depth for idx, _ in nodes],
                                          device=self.device))
            # a node sees its expanded ancestors (and itself); expanded nodes sit at kv.filled + k
            allowed = []
            for idx, _ in nodes:
                anc, p = set(), job.candidates[idx].parent
                while p >= 0:
                    anc.add(p)
                    p = job.candidates[p].parent
                allowed.append([e in anc for e in expanded] + [False] * len(nodes))
            mask = torch.tensor(allowed, dtype=torch.bool, device=self.device)
            mask = mask.reshape(len(nodes), len(expanded) + len(nodes))
            mask[:, len(expanded):] = torch.eye(len(nodes), dtype=torch.bool, device=self.device)
            rows.append(_Rows(kv, kv.filled + len(expanded), kv.filled, mask))
            job.expanded = expanded + [idx for idx, _ in nodes]
        out = self._forward(torch.cat(embeds), torch.cat(feats), torch.cat(positions), rows)
        return list(out.split([len(f) for f in frontiers]))

    def _forward(self, embeds, feats, positions, rows: list[_Rows]) -> torch.Tensor:
        sizes = [r.mask.shape[0] for r in rows]

        def attend(q, k, v):
            outs = []
            for r, qs, ks, vs in zip(rows, q.split(sizes), k.split(sizes), v.split(sizes)):
                n = qs.shape[0]
                r.kv.k[:, r.slot:r.slot + n] = ks.transpose(0, 1)
                r.kv.v[:, r.slot:r.slot + n] = vs.transpose(0, 1)
                end = r.slot + n
                mask = torch.ones((n, end), dtype=torch.bool, device=self.device)
                mask[:, r.committed:] = r.mask
                qh = qs.view(n, self.num_kv_heads, self.groups, self.head_dim).permute(1, 0, 2, 3)
                qh = qh.reshape(self.num_kv_heads, n * self.groups, self.head_dim)
                scores = (qh @ r.kv.k[:, :end].transpose(1, 2)) * self.scale
                scores.masked_fill_(~mask.repeat_interleave(self.groups, dim=0), float("-inf"))
                o = torch.softmax(scores, dim=-1) @ r.kv.v[:, :end]
                outs.append(o.view(self.num_kv_heads, n, self.groups, self.head_dim)
                            .permute(1, 0, 2, 3).reshape(n, -1))
            return torch.cat(outs)

        return self.head.forward_hidden(embeds, feats, positions, attend)

    def _embed(self, tokens: list[int]) -> torch.Tensor:
        """Target embeddings of tokens, in the head's float32."""
        return self.embed_tokens(torch.tensor(tokens, device=self.device)).float()

    @staticmethod
    def _select(job: DraftJob) -> DraftTree:
        """Root plus the best draft_tokens - 1 candidates, closed under ancestors, parents first."""
        cands = job.candidates
        chosen: set[int] = set()
        for idx in sorted(range(len(cands)), key=lambda c: -cands[c].score):
            if len(chosen) >= job.config.draft_tokens - 1:
                break
            path = []
            while idx >= 0 and idx not in chosen:
                path.append(idx)
                idx = cands[idx].parent
            if len(chosen) + len(path) <= job.config.draft_tokens - 1:
                chosen.update(path)
        order = sorted(chosen, key=lambda c: (cands[c].depth, c))
        node_of = {c: i + 1 for i, c in enumerate(order)}
        tokens = [job.tokens[-1]] + [cands[c].token for c in order]
        parents = [-1] + [node_of.get(cands[c].parent, 0) for c in order]
        return DraftTree(tokens, parents)
