import pytest

from lookalike.model.config import apply_overrides, config_from_dict, config_to_dict, get_config


def test_presets_and_overrides_round_trip():
    config = apply_overrides(get_config("digits"), ["num_steps=7", "conv_widths=4,8", "margin=0.5"])
    assert (config.num_steps, config.conv_widths, config.margin) == (7, (4, 8), 0.5)
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("bad", ["nope=1", "num_steps", "num_steps=abc"])
def test_bad_override_names_the_input(bad):
    with pytest.raises(ValueError, match="bad override"):
        apply_overrides(get_config("tiny"), [bad])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="digits"):
        get_config("huge")
