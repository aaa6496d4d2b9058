"""Sampling along training: parameter/gradient sketches and the on-disk trajectory store.

No Lightning, no TensorBoard.
"""

__all__: list[str] = []
