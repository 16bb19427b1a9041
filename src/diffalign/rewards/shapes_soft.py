"""``shapes_soft``: a smooth, differentiable surrogate of the shapes verifier.

For gradient-based alignment (DRaFT, ReFL, noise optimisation) the verifier's hard decisions
(thresholds, connected components, argmax colours) have no gradient. This reward rebuilds its
colour logic softly, per pixel (all distances in 0..255 RGB units, as in
:mod:`diffalign.worlds.shapes`):

1. **soft foreground**: ``fg = sigmoid((max_c (255 - x_c) - FG_THRESHOLD) / t_fg)``;
2. **soft colour assignment**: the distance of the pixel's displacement from white to each
   palette colour's white->colour ramp (the verifier's own colour distance), turned into a
   softmax over the five colours plus an "other" option at ``MAX_COLOR_DIST``;
3. **soft mass** of colour ``k``: ``sum_pixels fg * p_k`` (in pixels of a 32x32 canvas);
4. **terms**, each in (0, 1], Cauchy-shaped so the gradient never vanishes far away:
   * ``match``: for each colour the prompt names, closeness of its mass to the mass the prompt
     implies (``count x`` the mean area of that shape over the renderer's sizes 6..12 px);
   * ``clean``: the mass of every other colour (and of "other" foreground) should be 0;
   * ``relation`` (relation prompts): a sigmoid of the soft-centroid displacement of the two
     named colours along the relation's axis, minus ``|displacement on the other axis|`` and the
     verifier's 2 px margin (:func:`diffalign.worlds.shapes.relation_holds`, made smooth).
5. **score** = mean of the terms, in (0, 1].

What it deliberately misses (so it can be *hacked*, which later experiments demonstrate):

* **shape** is ignored entirely: a red square scores like a red circle of the same area;
* **count** is only seen through total mass: one big blob with the area of two objects scores
  like two objects, and objects touching each other (one component for the verifier) are fine;
* relations between two objects **of the same colour** get a constant 0.5 (no signal);
* object **size** is not checked (a single 4-px-wide blob of the right mass is fine), nor are
  the verifier's minimum component size, aspect ratio and gap rules;
* faint tints below the foreground threshold still add a little mass.

So a generator optimised on it can raise ``shapes_soft`` while the exact ``shapes`` verifier
score stays flat or drops; use the verifier to measure.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from ..config import check_range
from ..worlds import shapes as world
from .base import Reward

_RAMPS = torch.tensor(255.0 - np.array(list(world.PALETTE.values()), np.float32))  # (5, 3)
_CIDX = {c: i for i, c in enumerate(world.COLORS)}
_SIZES = range(world.MIN_SIZE, world.MAX_SIZE + 1)
AREA = {s: float(np.mean([world.shape_mask(s, n).sum() for n in _SIZES])) for s in world.SHAPES}
# relation -> (axis of "along", sign): along = sign * (centre_a - centre_b)[axis]
_REL = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


@functools.lru_cache(maxsize=8192)
def _targets(prompt: str) -> tuple[tuple[float, ...], tuple | None, bool]:
    """(target mass per palette colour, or -1 where the colour should be absent; relation info or
    None for count and same-colour relation prompts; whether it is a relation prompt)."""
    p = world.parse(prompt)
    t = [-1.0] * len(world.COLORS)
    if p.kind == "count":
        t[_CIDX[p.color]] = p.count * AREA[p.shape]  # type: ignore[index,operator]
        return tuple(t), None, False
    (ca, sa), (cb, sb) = p.a, p.b  # type: ignore[misc]
    for c, s in ((ca, sa), (cb, sb)):
        t[_CIDX[c]] = max(t[_CIDX[c]], 0.0) + AREA[s]
    rel = None if ca == cb else (_CIDX[ca], _CIDX[cb], *_REL[p.relation])  # type: ignore[index]
    return tuple(t), rel, True


class ShapesSoftReward(Reward):
    """Differentiable surrogate of the shapes verifier (see the module docstring for what it misses).

    Temperatures: ``t_fg`` (foreground sigmoid, 0..255 units), ``t_color`` (colour softmax),
    ``t_rel`` (relation sigmoid, px); ``width`` scales the tolerance of the mass terms in units
    of one object's mean area.
    """

    name = "shapes_soft"
    differentiable = True

    def __init__(self, t_fg: float = 6.0, t_color: float = 8.0, t_rel: float = 2.0, width: float = 0.5):
        self.t_fg = check_range("t_fg", t_fg, 0, None, lo_open=True)
        self.t_color = check_range("t_color", t_color, 0, None, lo_open=True)
        self.t_rel = check_range("t_rel", t_rel, 0, None, lo_open=True)
        self.width = check_range("width", width, 0, None, lo_open=True)

    def soft_masses(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pixel soft colour weights ``[B, 6, H, W]`` (5 palette colours + "other", times the soft
        foreground), their masses ``[B, 6]`` in 32x32-canvas pixels, and centroids ``[B, 6, 2]`` (x, y)."""
        b, _, h, w = images.shape
        d = (1.0 - images.float()).permute(0, 2, 3, 1) * 255.0  # [B,H,W,3] displacement from white
        fg = torch.sigmoid((d.amax(-1) - world.FG_THRESHOLD) / self.t_fg)  # [B,H,W]
        ramps = _RAMPS.to(d.device)
        alpha = (d @ ramps.T / (ramps**2).sum(1)).clamp(0.0, 1.3)  # [B,H,W,5]
        diff = d[..., None, :] - alpha[..., None] * ramps  # [B,H,W,5,3]
        dist = (diff.pow(2).sum(-1) + 1e-6).sqrt()
        other = torch.full_like(dist[..., :1], world.MAX_COLOR_DIST)
        p = torch.softmax(-torch.cat([dist, other], -1) / self.t_color, dim=-1)  # [B,H,W,6]
        wgt = (fg[..., None] * p).permute(0, 3, 1, 2)  # [B,6,H,W]
        scale = world.IMAGE_SIZE**2 / (h * w)  # masses in pixels of a 32x32 canvas
        mass = wgt.sum((2, 3)) * scale
        ys = (torch.arange(h, device=d.device, dtype=d.dtype) + 0.5) * (world.IMAGE_SIZE / h)
        xs = (torch.arange(w, device=d.device, dtype=d.dtype) + 0.5) * (world.IMAGE_SIZE / w)
        cx = (wgt.sum(2) * xs).sum(-1) * scale / (mass + 1e-3)
        cy = (wgt.sum(3) * ys).sum(-1) * scale / (mass + 1e-3)
        return wgt, mass, torch.stack([cx, cy], -1)

    def terms(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """The individual terms ``match``, ``clean``, ``relation`` (NaN where not applicable), ``score``."""
        _, mass, cen = self.soft_masses(images)
        dev = mass.device
        info = [_targets(p) for p in prompts]
        tgt = torch.tensor([i[0] for i in info], dtype=mass.dtype, device=dev)  # [B,5]
        want = tgt >= 0
        sigma = self.width * min(AREA.values())
        close = 1.0 / (1.0 + ((mass[:, :5] - tgt) / sigma) ** 2)
        match = (close * want).sum(1) / want.sum(1)
        off = (mass[:, :5] * ~want).sum(1) + mass[:, 5]
        clean = 1.0 / (1.0 + (off / sigma) ** 2)
        # relation term, vectorised: r = (index of colour a, index of colour b, axis, sign) or None
        is_rel = torch.tensor([i[2] for i in info], device=dev)
        ia, ib, axis, sign = (torch.tensor(v, device=dev) for v in zip(*[i[1] or (0, 0, 0, 0.0) for i in info]))
        has = torch.tensor([i[1] is not None for i in info], device=dev)
        rows = torch.arange(len(prompts), device=dev)
        delta = cen[rows, ia] - cen[rows, ib]  # [B, 2] centroid of a minus centroid of b
        along = sign.to(delta.dtype) * delta.gather(1, axis[:, None]).squeeze(1)
        across = delta.gather(1, (1 - axis)[:, None]).squeeze(1)
        soft_rel = torch.sigmoid((along - (across**2 + 1.0).sqrt() - world.RELATION_MARGIN) / self.t_rel)
        nan = torch.full_like(match, float("nan"))
        rel = torch.where(has, soft_rel, torch.where(is_rel, torch.full_like(match, 0.5), nan))  # same colour: 0.5
        has_rel = ~torch.isnan(rel)
        # match counts once per named colour: a relation prompt has two objects to match
        n_match = want.sum(1).to(match.dtype)
        total = match * n_match + clean + torch.where(has_rel, rel, torch.zeros_like(rel))
        score = total / (n_match + 1 + has_rel.to(match.dtype))
        return {"match": match, "clean": clean, "relation": rel, "score": score}

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        t = self.terms(images, prompts)
        if meta is not None:
            for i, m in enumerate(meta):
                m["shapes_soft"] = {k: float(v[i]) for k, v in t.items()}
        return t["score"]

