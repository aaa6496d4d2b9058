"""Embeddings of point clouds: diffusion maps of trajectories, InPCA of predictions.

numpy/scipy/pynndescent only: no Lightning, no TensorBoard.
"""

__all__: list[str] = []
