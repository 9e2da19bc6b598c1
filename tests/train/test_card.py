"""The card's README (`card.render_markdown`): what it says about thresholds and images."""
from __future__ import annotations

from nucleiflow.pipeline.train.card import render_markdown

SETS = [{"root": "monuseg", "weight": 1.0, "train": 30, "validation": 0},
        {"root": "dsb2018-he", "weight": 0.0, "train": 73, "validation": 32}]


def _card(**training) -> dict:
    return {"name": "m", "arch": "student", "mpp": 0.42, "postprocess": {"method": "hv"},
            "training": training, "data": {"train": ["x"] * 103, "validation": ["v"] * 32, "sets": SETS}}


def test_given_thresholds_are_not_called_tuned():
    given = render_markdown(_card(tune_postprocess=False))
    assert "as the training config gives it" in given and "chosen on the validation" not in given
    tuned = render_markdown(_card(tune_postprocess=True))
    assert "thresholds chosen on the validation images" in tuned
    older = render_markdown(_card())  # cards from before the record: they were tuned
    assert "thresholds chosen on the validation images" in older


def test_a_validation_only_set_is_not_counted_as_trained_on():
    text = render_markdown(_card())
    assert "30 train images, 32 validation images" in text
