"""Prompts that carry more than text: conditioning images and a negative prompt.

Image-to-video and image-editing models condition on images beside the text. A :class:`Prompt`
is a ``str`` (its text) that also holds the paths of those images and the negative prompt of the
unconditional branch, so every list of prompts in diffalign -- rollouts, rewards, metrics,
``samples.jsonl`` -- carries the condition through unchanged; only a model that reads images
(``encode_prompts``) and a reward that compares with the source image look at it.

The unconditional branch of classifier-free guidance is :func:`negative_prompts`: the prompt's
negative text (empty by default) *with the same images* (an editing model is guided away from the
negative text, not away from the source image), marked ``unconditional`` -- a model may encode its
negative branch differently from a prompt with the same text (SANA drops its prompt-enhancing
instruction there).
"""

from __future__ import annotations

from typing import Any, Sequence


class Prompt(str):
    """A prompt's text (``str(p)``) with its conditioning ``images`` (paths) and ``negative`` prompt.

    Two prompts are equal when text, images and negative prompt all are; a ``Prompt`` without
    images or negative prompt equals (and hashes as) its plain text.
    """

    images: tuple[str, ...]
    negative: str
    unconditional: bool  # the unconditional branch of guidance (not part of equality)

    def __new__(cls, text: str, images: Sequence[Any] = (), negative: str = "",
                unconditional: bool = False) -> "Prompt":
        self = super().__new__(cls, text)
        if isinstance(images, (str, bytes)):
            raise ValueError(f"images must be a list of paths, got the single string {images!r}")
        self.images = tuple(str(i) for i in images)
        if not isinstance(negative, str):
            raise ValueError(f"negative prompt must be a string, got {type(negative).__name__}: {negative!r}")
        self.negative = str(negative)
        self.unconditional = bool(unconditional)
        return self

    @property
    def text(self) -> str:
        return str.__str__(self)

    def _key(self) -> tuple:
        return (self.text, self.images, self.negative)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Prompt):
            return self._key() == other._key()
        if isinstance(other, str):
            return not self.images and not self.negative and self.text == other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(self._key()) if self.images or self.negative else str.__hash__(self)

    def __reduce__(self):
        return (Prompt, (self.text, self.images, self.negative, self.unconditional))

    def __repr__(self) -> str:
        extra = "".join([f", images={list(self.images)!r}" if self.images else "",
                         f", negative={self.negative!r}" if self.negative else "",
                         ", unconditional=True" if self.unconditional else ""])
        return f"Prompt({self.text!r}{extra})"


def prompt_images(prompt: str) -> tuple[str, ...]:
    """The conditioning image paths of a prompt (none for a plain string)."""
    return getattr(prompt, "images", ())


def is_unconditional(prompt: str) -> bool:
    return bool(getattr(prompt, "unconditional", False))


def negative_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts of the unconditional branch of guidance, one per prompt: the negative text
    (``""`` for plain text) with the prompt's conditioning images, marked ``unconditional``."""
    return [Prompt(getattr(p, "negative", ""), prompt_images(p), unconditional=True) for p in prompts]


def load_image(path: str, size: tuple[int, int] | None = None) -> Any:
    """An RGB image file -> float tensor ``[3, H, W]`` in ``[0, 1]``; resized (Lanczos) to
    ``size = (H, W)`` when given and different. PIL is imported here, not with ``core``."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((int(size[1]), int(size[0])), Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255
