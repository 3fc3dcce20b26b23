"""Spectrogram pictures: the PNGs of `spectron continue` / `spectron eval` and the sample grids
written to TensorBoard during training.

matplotlib is imported inside each function (with the file-only Agg backend): a command that
draws nothing should not pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display on servers and in tests.
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(path, dpi=80)


def save_spectrogram_png(
    path: str | os.PathLike,
    prompt: np.ndarray,
    continuation: np.ndarray,
    title: str = "",
    reference: np.ndarray | None = None,
) -> None:
    """Writes a PNG of the prompt and continuation log-mels (and a reference continuation).

    Args:
      path: output file.
      prompt: float32[T_p, n_mels]; continuation / reference: float32[T, n_mels].
      title: figure title.
    """
    plt = _pyplot()
    panels = [("prompt", prompt), ("generated continuation", continuation)]
    if reference is not None:
        panels.append(("reference continuation", reference))
    # One colour scale for every panel, so that loudness is comparable between them.
    values = np.concatenate([np.ravel(m) for _, m in panels] + [np.zeros(1)])
    vmin, vmax = np.percentile(values, [1, 99.5]) if values.size > 1 else (0.0, 1.0)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), squeeze=False)
    for ax, (name, mel) in zip(axes[:, 0], panels, strict=True):
        if len(mel):
            ax.imshow(
                np.asarray(mel).T,
                origin="lower",
                aspect="auto",
                interpolation="nearest",
                vmin=vmin,
                vmax=vmax,
            )
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel("frame")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def sample_grid_png(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    prompt_frames: Sequence[int] | None = None,
) -> np.ndarray:
    """Writes a grid of (reference | generated) log-mels, one row per sample; returns it.

    Args:
      path: output file.
      rows: per sample {"reference", "generated": float32[T, n_mels] (the frames drawn),
        "reference_text", "generated_text": panel titles}.
      prompt_frames: per sample, frames of prompt at the start of each panel (a line marks
        where the continuation starts); None = the panels hold continuations only.

    Returns:
      uint8[H, W, 3]: the picture, for TensorBoard.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.2 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, kind in enumerate(("reference", "generated")):
            ax = axes[i, j]
            ax.imshow(np.asarray(row[kind]).T, origin="lower", aspect="auto", cmap="magma")
            ax.set_title(f"{kind}: {row[f'{kind}_text']}", fontsize=8)
            if prompt_frames is not None:
                ax.axvline(prompt_frames[i] - 0.5, color="cyan", lw=1)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
