import pytest

from sae_core import UserError, format_layers, parse_layers


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0-31", list(range(32))),
        ("0,4,8", [0, 4, 8]),
        ("0-29:2", list(range(0, 30, 2))),
        ("all", list(range(32))),
        ("all:8", [0, 8, 16, 24]),
        ("all:8,31", [0, 8, 16, 24, 31]),  # items combine: every 8th layer and the last
        ("3,all", list(range(32))),
        ("8,0,4,4", [0, 4, 8]),
        (" 1 - 3 , 31", [1, 2, 3, 31]),
        ("0 1", [0, 1]),  # whitespace separates, as a comma does: never "01"
        ("1 2", [1, 2]),
        ("0-1 8 , 0-29 : 14", [0, 1, 8, 14, 28]),
        ("10", [10]),
        (10, [10]),
        ([3, 1], [1, 3]),
    ],
)
def test_specs(spec, expected):
    assert parse_layers(spec, 32) == expected


@pytest.mark.parametrize(
    "spec, match",
    [
        ("32", r"layer 32 is out of range: the model has layers 0-31"),
        ("0-40", r"layer 32 is out of range"),
        ("a-b", r"malformed layer spec 'a-b'"),
        ("1,,2", r"malformed layer spec"),
        ("-1", r"malformed layer spec"),
        ("5-2", r"need start <= end"),
        ("0-10:0", r"step >= 1"),
        ("", r"malformed layer spec"),
        ("all:0", r"malformed layer spec 'all:0': the step after 'all:' must be a whole number >= 1"),
        ("all:x", r"malformed layer spec 'all:x': the step after"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(UserError, match=match):
        parse_layers(spec, 32)


def test_format_roundtrip():
    for layers in ([0, 1, 2, 5], [3], list(range(0, 30, 2)), [0, 1, 2, 3, 10, 11]):
        assert parse_layers(format_layers(layers), 32) == layers
    assert format_layers([0, 1, 2, 5]) == "0-2,5"
