import pytest

from fastimp import durations
from fastimp.durations import Duration, iterations_per_epoch, parse, to_steps


@pytest.mark.parametrize("text,expected", [
    ("62400it", Duration(62400, "it")), ("2000ba", Duration(2000, "it")),
    ("160ep", Duration(160, "ep")), ("0.5ep", Duration(0.5, "ep")), (2000, Duration(2000, "it")),
    ("2000", Duration(2000, "it")), (" 250 IT ", Duration(250, "it")), (0, Duration(0, "it")),
])
def test_parse(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("bad", ["", "12xx", "-5it", "1.5it", "ep", "it5", "1e3it"])
def test_parse_rejects_bad_strings(bad):
    with pytest.raises(ValueError):
        parse(bad)


@pytest.mark.parametrize("bad", [None, [1], True, 1.5])
def test_parse_rejects_bad_types(bad):
    with pytest.raises((TypeError, ValueError)):
        parse(bad)


def test_negative_int_rejected():
    with pytest.raises(ValueError):
        parse(-1)


def test_iterations_per_epoch_cifar10():
    # OpenLTH: 391 iterations per epoch (no drop_last); the paper's 62,400 = 160 x 390.
    assert iterations_per_epoch(50000, 128, drop_last=False) == 391
    assert iterations_per_epoch(50000, 128, drop_last=True) == 390
    assert to_steps("160ep", 390) == 62400
    assert to_steps("80ep", 390) == 31200 and to_steps("120ep", 390) == 46800
    assert to_steps("160ep", 391) == 62560
    assert iterations_per_epoch(0, 4, False) == 0
    assert iterations_per_epoch(8, 4, False) == 2 == iterations_per_epoch(8, 4, True)
    assert iterations_per_epoch(9, 4, False) == 3 and iterations_per_epoch(9, 4, True) == 2


def test_iterations_per_epoch_validates():
    with pytest.raises(ValueError, match="batch_size"):
        iterations_per_epoch(10, 0, False)
    with pytest.raises(ValueError, match="num_examples"):
        iterations_per_epoch(-1, 4, False)


def test_to_steps():
    assert to_steps("62400it") == 62400
    assert to_steps(17) == 17
    assert to_steps("2000ba", 7) == 2000
    assert to_steps("0.5ep", 390) == 195
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        to_steps("3ep")
    with pytest.raises(ValueError, match="whole"):
        to_steps("0.5ep", 391)
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        to_steps("1ep", 0)


def test_format_round_trips():
    for d in ["62400it", "160ep", "0.5ep", "0it"]:
        assert durations.format_duration(d) == d
        assert parse(durations.format_duration(d)) == parse(d)
    assert durations.format_duration("2000ba") == "2000it"
    assert durations.format_duration(5) == "5it"
