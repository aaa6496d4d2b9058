"""Markdown text cards (e.g. how to read the signed-log spectrum axis)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_landscape._checks import check_nonempty_str

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["write_text"]


def write_text(writer: SummaryWriter | Any, tag: str, markdown: str, step: int = 0) -> None:
    """Write a Markdown card to the text dashboard.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (or an object with ``add_text``).
        tag: Text tag, e.g. ``"landscape/hessian/spectrum_axis"``.
        markdown: The text (TensorBoard renders Markdown, tables included).
        step: Global step.

    Raises:
        ValueError: If ``tag`` is empty or ``markdown`` is not a string.
    """
    check_nonempty_str("tag", tag)
    if not isinstance(markdown, str):
        raise ValueError(f"markdown must be a string; got {type(markdown).__name__}")
    writer.add_text(tag, markdown, global_step=int(step))
