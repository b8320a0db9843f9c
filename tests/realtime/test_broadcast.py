"""Frames are encoded once, by orjson, with the json module for what orjson refuses."""

from __future__ import annotations

import json

from realtime.broadcast import frame_text


def test_frame_text_is_compact_json_of_the_frame() -> None:
    frame = {"type": "JOB_UPDATE", "result": {"text": "é ✓", "n": [1, 2.5, None]}, "error": None}
    text = frame_text(frame)
    assert json.loads(text) == frame
    assert text == json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def test_integers_beyond_64_bits_still_encode() -> None:
    frame = {"type": "JOB_UPDATE", "result": {"sum": 2**70}}
    assert json.loads(frame_text(frame)) == frame
