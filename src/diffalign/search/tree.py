"""Tree search over denoising trajectories that reuses earlier prefixes, in the spirit of DTS.

Jain et al. 2025, "Diffusion Tree Sampling: Scalable inference-time alignment of diffusion
models" (DTS, and its greedy variant DTS*). Every node is a partial state
``x_t`` of the chain (the root is ``x_T``); a child is one stochastic step
``x_{t-1} ~ p_theta(. | x_t)`` from it. One iteration

1. **selects** a node: from the root, stop at the first node that may take another child, else
   descend to a child -- DTS* the one of highest value, DTS one drawn from
   ``softmax(lambda v(child))``; how many children a node may have grows with its visit count
   ``N`` by progressive widening, ``ceil(c (N + 1)^alpha)`` (Coulom 2007; Couetoux et al. 2011),
   and only nodes at depth ``<= max_branch_depth`` branch;
2. **expands** it with a fresh noise draw and **rolls out** to ``x_0`` with the model's sampler,
   storing every new state (and its model output) as a node;
3. **backs up** the terminal reward ``r(x_0)``: DTS* ``v(x_t) = max_children v``, DTS the soft
   Bellman backup ``v(x_t) = (1/lambda) log mean_children exp(lambda v)``.

Reuse: a rollout from a stored node at depth ``d`` with a cached model output costs only
``T - d - 1`` NFE instead of ``T``; ``trace["nfe_saved"]`` adds up the difference. The result is
DTS*'s best terminal sample (``mode="greedy"``), or for ``mode="sample"`` a leaf drawn by
descending the final tree with the soft values (DTS).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..config import check_choice, check_range
from .base import (Engine, SearchResult, candidate_generator, expand_prompts, finish, get_reward, method_generator,
                   per_image_budget, resolve_settings)


class Node:
    __slots__ = ("x", "out", "depth", "parent", "children", "visits", "value", "closed")

    def __init__(self, x: torch.Tensor, depth: int, parent: "Node | None"):
        self.x, self.out, self.depth, self.parent = x, None, depth, parent
        self.children: list[Node] = []
        self.visits, self.value, self.closed = 0, -math.inf, False


class _Tree:
    def __init__(self, root: Node, T: int, mode: str, lam: float, c: float, alpha: float, max_depth: int,
                 gen: torch.Generator):
        self.root, self.T, self.mode, self.lam = root, T, mode, lam
        self.c, self.alpha, self.max_depth, self.gen = c, alpha, max_depth, gen
        self.best: Node | None = None

    def can_branch(self, n: Node) -> bool:
        return n.depth <= self.max_depth and len(n.children) < math.ceil(self.c * (n.visits + 1) ** self.alpha)

    def choose(self, children: list[Node]) -> Node:
        if self.mode == "greedy":
            return max(children, key=lambda ch: ch.value)
        v = torch.tensor([ch.value for ch in children], dtype=torch.float64)
        return children[int(torch.multinomial(torch.softmax(self.lam * v, 0), 1, generator=self.gen))]

    def select(self) -> Node | None:
        n = self.root
        while not n.closed:
            if self.can_branch(n):
                return n
            open_ = [ch for ch in n.children if not ch.closed]
            if not open_:  # exhausted for now: close it and start again from the root
                n.closed, n = True, self.root
                continue
            n = self.choose(open_)
        return None

    def backup(self, leaf: Node, r: float) -> None:
        leaf.value, leaf.closed, leaf.visits = r, True, 1
        if self.best is None or r > self.best.value:
            self.best = leaf
        n = leaf.parent
        while n is not None:
            n.visits += 1
            vals = torch.tensor([ch.value for ch in n.children], dtype=torch.float64)
            if self.mode == "greedy":
                n.value = float(vals.max())
            else:  # soft Bellman backup over the children (samples of p_theta)
                n.value = float((torch.logsumexp(self.lam * vals, 0) - math.log(len(vals))) / self.lam) \
                    if self.lam > 0 else float(vals.mean())
            n.closed = n.depth > self.max_depth and all(ch.closed for ch in n.children)
            n = n.parent

    def sample_leaf(self) -> Node:
        n = self.root
        while n.depth < self.T:
            n = self.choose(n.children)
        return n


def tree_search(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
                mode: str = "greedy", lam: float = 10.0, widening: float = 1.0, widening_exponent: float = 0.5,
                max_branch_depth: int | None = None, sampler: str | None = None, num_steps: int | None = None,
                guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
                max_batch: int = 256) -> SearchResult:
    """DTS* (``mode="greedy"``) or DTS (``mode="sample"``, temperature ``lam``) with the whole budget
    spent on rollouts (each image stops when its next rollout would overrun its share). Progressive
    widening ``ceil(widening * (N + 1)^widening_exponent)``; ``max_branch_depth`` (default
    ``num_steps - 1``): the deepest grid index that branches. The sampler must be stochastic.

    trace: ``rollouts [N]``, ``nfe_saved`` (vs. independent samples), ``tree_nodes [N]``,
    ``best_by_rollout`` (list per image of the best reward after each rollout).
    """
    reward = get_reward(reward)
    check_choice("mode", mode, ("greedy", "sample"))
    check_range("lam", lam, 0, None)
    check_range("widening", widening, 0, None, lo_open=True)
    check_range("widening_exponent", widening_exponent, 0, 1)
    image_prompts, seeds = expand_prompts(prompts, num_images_per_prompt, seed)
    s = resolve_settings(model, sampler, num_steps, guidance_scale, eta, stochastic=True, method="dts")
    T, N = s.num_steps, len(image_prompts)
    max_depth = T - 1 if max_branch_depth is None else check_range("max_branch_depth", max_branch_depth, 0, T - 1,
                                                                    integer=True)
    per = per_image_budget(budget, N, T, "dts", f"one {T}-step rollout", model=model)
    eng = Engine(model, image_prompts, s, reward, max_batch=max_batch)
    streams = [candidate_generator(sd, 0) for sd in seeds]
    x_root = eng.init_noise(streams)
    trees = [_Tree(Node(x_root[i], 0, None), T, mode, lam, widening, widening_exponent, max_depth,
                   method_generator(seeds[i])) for i in range(N)]
    spent, rollouts, saved = [0] * N, [0] * N, 0
    history: list[list[float]] = [[] for _ in range(N)]
    active = set(range(N))
    with torch.no_grad():
        while active:
            items: list[tuple[int, Node]] = []
            for i in sorted(active):
                node = trees[i].select()
                cost = None if node is None else (node.out is None) + T - node.depth - 1
                if node is None or spent[i] + cost > per:
                    active.discard(i)
                    continue
                items.append((i, node))
                spent[i] += cost
                rollouts[i] += 1
                saved += T - cost
            if not items:
                break
            leaves = _rollout(eng, items, streams)
            r = eng.score(torch.stack([leaf.x for leaf in leaves]), torch.tensor([i for i, _ in items]))
            for (i, _), leaf, ri in zip(items, leaves, r.tolist()):
                trees[i].backup(leaf, ri)
                history[i].append(trees[i].best.value)
    chosen = [tr.best if mode == "greedy" else tr.sample_leaf() for tr in trees]
    x0 = torch.stack([leaf.x for leaf in chosen])
    scores = torch.tensor([leaf.value for leaf in chosen], dtype=torch.float32)
    trace = {"mode": mode, "lam": lam, "rollouts": torch.tensor(rollouts), "nfe_saved": saved,
             "tree_nodes": torch.tensor([_count(tr.root) for tr in trees]), "best_by_rollout": history,
             "max_branch_depth": max_depth}
    return finish(eng, "dts", budget, x0, scores, image_prompts, seeds, trace)


def _rollout(eng: Engine, items: list[tuple[int, Node]], streams: list[torch.Generator]) -> list[Node]:
    """Expand every item's node with a fresh child and roll it out to ``t = 0``, batched over the
    items that are at the same grid point (items join when the loop reaches their depth)."""
    T = eng.num_steps
    cur = [node for _, node in items]
    start = min(node.depth for node in cur)
    for j in range(start, T):
        act = [a for a, node in enumerate(cur) if node.depth == j]
        need = [a for a in act if cur[a].out is None]
        if need:
            out = eng.predict(torch.stack([cur[a].x for a in need]), j, torch.tensor([items[a][0] for a in need]))
            for b, a in enumerate(need):
                cur[a].out = out[b]
        x = torch.stack([cur[a].x for a in act])
        out = torch.stack([cur[a].out for a in act])
        x_next = eng.step(x, out, j, eng.noise([streams[items[a][0]] for a in act]))
        for b, a in enumerate(act):
            child = Node(x_next[b], j + 1, cur[a])
            cur[a].children.append(child)
            cur[a] = child
    return cur


def _count(root: Node) -> int:
    n, stack = 0, [root]
    while stack:
        node = stack.pop()
        n += 1
        stack.extend(node.children)
    return n
