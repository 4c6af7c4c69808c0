"""Global image embeddings of an inference run as one CSV (``id, e0 .. e{E-1}``), beside the class probabilities.

The ASG bundle's inference gives, per image, the finding probabilities (its network's output) and the L2-normalised
global embedding ``ĝ = norm(GlobalEmbedding(ViT [CLS]))`` (specs/asg.md §3.3) that retrieval and zero-shot prompts
compare with report embeddings. The embedding is a second, gradient-free pass of the network's ``embed`` on the
batch's images (the image encoder runs twice per batch).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from common.utils.files import write_csv

__all__ = ["EmbeddingWriter"]


class EmbeddingWriter:
    """Write ``<output_dir>/<filename>`` (one row per image, sorted by id) when the run completes, atomically.

    Args:
        network: a module with ``embed(image [B, 3, H, W]) -> [B, E]`` (e.g. :class:`common.networks.asg.ASGModel`).
        output_dir: folder of the CSV.
        filename: CSV file name.
        image_key, id_key: keys of the (decollated) batch items.
    """

    def __init__(self, network: nn.Module, output_dir: str | os.PathLike, filename: str = "embeddings.csv",
                 image_key: str = "image", id_key: str = "id") -> None:
        self.network = network
        self.path = Path(output_dir) / filename
        self.image_key, self.id_key = image_key, id_key
        self.rows: list[list[str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        items = engine.state.batch
        images = torch.stack([torch.as_tensor(item[self.image_key]) for item in items]).to(engine.state.device)
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            embeddings = self.network.embed(images.float()).float().cpu()
        self.network.train(was_training)
        for item, vector in zip(items, embeddings):
            self.rows.append([str(item[self.id_key]), *(f"{v:.6f}" for v in vector.tolist())])

    def _write(self, _: Engine) -> None:
        if not self.rows:
            raise ValueError("EmbeddingWriter: the inference saw no image")
        dim = len(self.rows[0]) - 1
        write_csv(self.path, ["id", *(f"e{k}" for k in range(dim))], sorted(self.rows))
