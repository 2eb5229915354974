"""The compiled int8 build's speed checks (diglett/model/compiled_int8.py):
a package replaces the traced int8 model only where it runs faster, and a
build stops before compiling where the int8 layers are far slower."""

from diglett.model.compiled_int8 import EAGER_MAX_RATIO, eager_check, speed_check


def test_a_package_slower_than_the_traced_model_is_refused_with_both_times():
    assert speed_check(0.7018, 0.4932) == (
        "slower than the traced int8 model on this machine "
        "(702 ms against 493 ms for 3 windows of 1.5 s)"
    )


def test_a_package_as_fast_or_faster_is_kept():
    assert speed_check(0.012, 0.020) is None
    assert speed_check(0.020, 0.020) is None


def test_a_build_stops_before_compiling_where_int8_layers_are_far_slower():
    # As measured on an AMD EPYC without AVX-512 (docs/internals.md).
    assert eager_check(7.962, 0.162) == (
        "slower than the traced int8 model on this machine, seen before "
        "compiling: its int8 layers took 7962 ms against 162 ms for 3 windows "
        "of 1.5 s"
    )
    assert eager_check(EAGER_MAX_RATIO * 0.02, 0.02) is not None


def test_a_build_goes_on_where_compiling_can_win():
    # Eager int8 layers pay per-layer quantization steps the compile fuses.
    assert eager_check(0.05, 0.02) is None
    assert eager_check(EAGER_MAX_RATIO * 0.02 * 0.99, 0.02) is None
