"""scripts/fewshot_host_table.py: several CD-TG sweeps joined into the model card's host table."""

from __future__ import annotations

import pytest
from PIL import Image

from common.handlers.fewshot_report import RESULT_COLUMNS
from common.utils.files import write_csv

from conftest import load_script

table_script = load_script("fewshot_host_table")


def _row(target: str, shot: int, model: str, alpha: str, miou: float, fbiou: float) -> dict:
    return {"target": target, "shot": shot, "model": model, "alpha": alpha, "miou": miou, "fbiou": fbiou,
            "episodes": 60, "seconds": 1.0}


def test_table_pairs_each_host_with_its_text_guided_run_at_the_chosen_alpha(tmp_path):
    patnet = write_csv(tmp_path / "patnet.csv", RESULT_COLUMNS, [
        _row("wbc", 1, "PATNet", "", 10.0, 50.0),
        _row("wbc", 1, "PATNet + CD-TG", "0.3", 99.0, 99.0),  # another alpha: not in the table
        _row("wbc", 1, "PATNet + CD-TG", "0.7", 12.5, 51.25),
        _row("wbc", 5, "PATNet", "", 20.0, 60.0),
        _row("wbc", 5, "PATNet + CD-TG", "0.7", 17.0, 58.04),
    ])
    qnet = write_csv(tmp_path / "qnet.csv", RESULT_COLUMNS, [_row("wbc", 1, "Q-Net", "", 3.0, 40.0)])
    out, figure = tmp_path / "table.md", tmp_path / "hosts.png"
    table = table_script.fewshot_host_table(str(qnet), str(patnet), alpha=0.7, out=str(out), figure=str(figure))
    lines = table.splitlines()
    assert lines[0] == ("| host | target | 1-shot host | 1-shot + CD-TG (α = 0.7) | 1-shot Δ mIoU | 5-shot host | "
                        "5-shot + CD-TG (α = 0.7) | 5-shot Δ mIoU |")
    # hosts in registry order (PATNet before Q-Net) whatever the file order; 12.5 - 10.0 = +2.5, 17.0 - 20.0 = -3.0;
    # 51.25 and 58.04 round to one decimal as 51.2 (half to even of the binary value) and 58.0
    assert lines[2] == "| PATNet | wbc | 10.0 / 50.0 | 12.5 / 51.2 | +2.5 | 20.0 / 60.0 | 17.0 / 58.0 | -3.0 |"
    # Q-Net has no text-guided run and no 5-shot run: dashes, no gain
    assert lines[3] == "| Q-Net | wbc | 3.0 / 40.0 | – | – | – | – | – |"
    assert len(lines) == 4 and out.read_text() == table + "\n"
    with Image.open(figure) as png:  # one panel per shot, drawn
        assert png.format == "PNG" and png.height > png.width / 4


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="missing.csv: no such results file"):
        table_script.read_results([tmp_path / "missing.csv"])
    other = write_csv(tmp_path / "other.csv", ("target", "shot"), [("wbc", 1)])
    with pytest.raises(ValueError, match=r"other.csv: not a few-shot results file.*'model'"):
        table_script.read_results([other])
    with pytest.raises(ValueError, match="unknown model name.*'UNet'"):
        table_script.host_scores([_row("wbc", 1, "UNet", "", 1.0, 1.0)], alpha=0.7)
    with pytest.raises(ValueError, match="no host results at alpha = 0.5"):
        table_script.host_scores([_row("wbc", 1, "PATNet + CD-TG", "0.7", 1.0, 1.0)], alpha=0.5)
