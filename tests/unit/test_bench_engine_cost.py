"""bench/engine_cost.py: the settings variants it compares."""

from __future__ import annotations

import pytest

from bench import engine_cost as ec
from diglett.settings import Settings


def test_a_variant_is_typed_settings_over_the_base():
    base = Settings()
    s = ec.parse_variant("quiet_gain_db=0,vad=energy,speech_min_frac=0.45", base)
    assert (s.quiet_gain_db, s.vad, s.speech_min_frac) == (0.0, "energy", 0.45)
    assert ec.parse_variant("", base) == base
    with pytest.raises(ValueError):
        ec.parse_variant("quiet_gain_db=loud", base)
    with pytest.raises(ValueError, match="no_such_setting"):
        ec.parse_variant("no_such_setting=1", base)
