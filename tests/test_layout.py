"""Layout maths: pure functions over lists of ints."""

import random

import pytest

from lckv.layout import (
    LayoutError,
    has_upward,
    iteration_plan,
    kv_cache_fraction,
    kv_layers,
    parse_layout,
    sample_routing,
    validate_kv_sources,
    vllm_sharing_map,
)


def test_sandwich_2_on_22_layers_matches_the_issue():
    assert parse_layout("sandwich:2", 22) == [0] + [20] * 20 + [21]


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("bottom:2", 6, [0, 1, 5, 5, 5, 5]),
        ("top:2", 6, [3, 3, 3, 3, 4, 5]),
        ("sandwich:3", 8, [0, 1, 6, 6, 6, 6, 6, 7]),
        ("sandwich:0", 4, [3, 3, 3, 3]),
        ("bottom:0", 4, [3, 3, 3, 3]),
        ("cla:2", 5, [0, 0, 2, 2, 4]),
        ("cla:3", 7, [0, 0, 0, 3, 3, 3, 6]),
        ("cla:1", 3, [0, 1, 2]),
        ("plain", 3, [0, 1, 2]),
        ("0,2,2", 3, [0, 2, 2]),
        (" Sandwich:2 ", 4, [0, 2, 2, 3]),
    ],
)
def test_parse_layout(spec, n, expected):
    assert parse_layout(spec, n) == expected


def test_kv_fraction_is_warmup_plus_one_over_layers():
    ks = parse_layout("sandwich:2", 30)
    assert kv_layers(ks) == [0, 28, 29]
    assert kv_cache_fraction(ks) == pytest.approx(3 / 30)


@pytest.mark.parametrize(
    "spec, n, fragment",
    [
        ("sandwich:6", 6, "fewer warmup layers"),
        ("bottom:9", 4, "fewer warmup layers"),
        ("middle:2", 6, "unknown layout kind"),
        ("sandwich", 6, "unknown layout"),
        ("sandwich:x", 6, "unknown layout"),
        ("0,1", 3, "2 entries but the model has 3"),
        ("0,7,1", 3, "not a layer index"),
        ("0,2,1", 3, "must compute its own"),
        ("a,b", 2, "bad layout list"),
        ("cla:0", 4, "at least 1"),
    ],
)
def test_bad_layouts_raise_clear_errors(spec, n, fragment):
    with pytest.raises(LayoutError, match=fragment):
        parse_layout(spec, n)


def test_validate_rejects_chained_sources():
    with pytest.raises(LayoutError, match="set kv_sources\\[1\\] = 1"):
        validate_kv_sources([0, 0, 1])


def test_iteration_plan_segments():
    assert iteration_plan([0, 1, 2]) == [(0, 2, False)]
    assert iteration_plan(parse_layout("sandwich:2", 8)) == [(0, 0, False), (1, 6, True), (7, 7, False)]
    assert iteration_plan([0, 5, 5, 3, 3, 5]) == [(0, 0, False), (1, 5, True)]
    assert iteration_plan([2, 2, 2, 5, 5, 5]) == [(0, 2, True), (3, 5, True)]
    assert iteration_plan(parse_layout("cla:2", 4)) == [(0, 3, False)]


def test_upward_and_vllm_map():
    assert has_upward(parse_layout("sandwich:2", 6))
    assert not has_upward(parse_layout("cla:2", 6))
    assert vllm_sharing_map(parse_layout("cla:2", 4)) == {1: 0, 3: 2}
    with pytest.raises(LayoutError, match="vLLM"):
        vllm_sharing_map(parse_layout("sandwich:2", 6))


def test_routing_samples():
    assert sample_routing(6, 0.0, rng=random.Random(1)) == list(range(6))
    assert sample_routing(6, 1.0, "previous", rng=random.Random(1)) == [0, 0, 1, 2, 3, 4]
    a = [sample_routing(12, 0.5, rng=random.Random(7)) for _ in range(3)]
    b = [sample_routing(12, 0.5, rng=random.Random(7)) for _ in range(3)]
    assert a == b
    for _ in range(50):
        s = sample_routing(12, 0.5, rng=random.Random(_))
        assert all(src <= i for i, src in enumerate(s))
    targets = [parse_layout("cla:2", 6), parse_layout("cla:3", 6)]
    s = sample_routing(6, 1.0, "kv_layers_of", rng=random.Random(0), layouts=targets)
    assert s in targets
    with pytest.raises(LayoutError):
        sample_routing(4, 1.5)
