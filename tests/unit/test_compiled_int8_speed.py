"""The compiled int8 build's speed check (diglett/model/compiled_int8.py):
a package replaces the traced int8 model only where it runs faster."""

from diglett.model.compiled_int8 import speed_check


def test_a_package_slower_than_the_traced_model_is_refused_with_both_times():
    assert speed_check(0.7018, 0.4932) == (
        "slower than the traced int8 model on this machine "
        "(702 ms against 493 ms for 3 windows of 1.5 s)"
    )


def test_a_package_as_fast_or_faster_is_kept():
    assert speed_check(0.012, 0.020) is None
    assert speed_check(0.020, 0.020) is None
