"""Encode a CD-TG category description file into a text-embedding table (specs/cdtg.md §5.1-§5.3).

The class captions and the background caption of ``--descriptions`` (schema: ``common.data.category_text``) are
encoded once with a frozen text encoder and written to ``--out`` as a ``.pt`` table (``E [n, d]``, ``e_bg [d]``,
names and provenance) that the episode datasets index::

    python scripts/encode_prompts.py --descriptions common/data/prompts/isic.json \\
        --out isic_vitb32.pt --encoder open_clip --model_name ViT-B-32 --weights /models/ViT-B-32.pt
    python scripts/encode_prompts.py --descriptions .../wbc.json --out wbc_minilm.pt --encoder sentence

Without ``--weights`` an open_clip tower is randomly initialised (nothing is downloaded).
"""

from __future__ import annotations

import logging

import fire

from common.data.category_text import encode_descriptions
from common.networks.text_encoders import make_text_encoder

__all__ = ["encode_prompts"]


def encode_prompts(descriptions: str, out: str, encoder: str = "open_clip", model_name: str | None = None,
                   weights: str | None = None) -> dict[str, object]:
    """Encode ``descriptions`` with ``make_text_encoder(encoder, model_name, weights)`` and save the table to
    ``out``; returns a summary (output path, encoder name, dimension, class names)."""
    text_encoder = make_text_encoder(encoder, model_name, weights)
    table = encode_descriptions(descriptions, text_encoder)
    table.save(out)
    summary = {"out": str(out), "encoder": text_encoder.name, "dim": table.dim, "names": table.names}
    logging.info("encoded %d classes + background of %s with %s -> %s", len(table), descriptions,
                 text_encoder.name, out)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    fire.Fire(encode_prompts)
