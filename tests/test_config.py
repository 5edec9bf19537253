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


@pytest.mark.parametrize("override, message", [
    ("val_fraction=-0.2", r"val_fraction=-0.2: must be in \[0, 1\)"),
    ("val_fraction=1.5", r"val_fraction=1.5: must be in \[0, 1\)"),
    ("learning_rate=-1", "learning_rate=-1.0: must be a positive number"),
    ("learning_rate=nan", "learning_rate=nan: must be a positive number"),
    ("margin=0", "margin=0.0: must be a positive number"),
    ("seed=-1", "seed=-1: must not be negative"),
    ("weight_decay=-0.1", "weight_decay=-0.1: must not be negative"),
    ("weight_decay=inf", "weight_decay=inf: must be a finite number"),
    ("max_train_minutes=inf", "max_train_minutes=inf: must be a finite number"),
    ("seed=9223372036854775808", "seed=9223372036854775808: must be at most 2147483647"),
    ("prefetch_batches=0", "prefetch_batches=0: must be at least 1"),
    ("hidden_dim=0", "hidden_dim=0: must be at least 1"),
    ("conv_widths=8,0", "conv_widths=8,0: every width must be at least 1"),
    ("image_size=3", "image_size=3: the conv encoder halves it 2 times .* must be at least 4"),
    ("channels=2", r"channels=2: must be 1 \(grayscale\) or 3 \(RGB\)"),
    ("conv_widths=8,,16", "expected integers separated by single commas"),
    ("conv_widths=,8", "expected integers separated by single commas"),
    ("num_steps=abc", r"bad override 'num_steps=abc': expected a whole number such as \d+, got 'abc'$"),
    ("num_steps=1.5e3x", r"expected a whole number such as \d+, got '1.5e3x'$"),
    ("num_steps=2.5", r"expected a whole number such as \d+, got '2.5'$"),
    ("learning_rate=1e-3x", r"bad override 'learning_rate=1e-3x': expected a number such as [\d.e-]+, got '1e-3x'$"),
    ("augment_flip=maybe", r"^bad override 'augment_flip=maybe': expected true or false \(or yes/no, 1/0\)$"),
    ("augment_crop_area=0", r"augment_crop_area=0.0: must be in \[0.05, 1\]"),
    ("augment_rotate_deg=200", r"augment_rotate_deg=200.0: must be in \[0, 180\]"),
    ("loss=triplet,pk_classes=1", r"pk_classes=1: triplets need at least 2 classes per batch"),
    ("loss=triplet,pk_images=1", r"pk_images=1: triplets need at least 2 images per class"),
])
def test_out_of_range_values_name_the_field_before_any_work(override, message):
    from lookalike.model.config import validate_config

    with pytest.raises(ValueError, match=message):
        validate_config(apply_overrides(get_config("tiny"), override.split(",") if "loss=" in override else [override]))


def test_whole_numbers_may_be_written_as_floats_and_contrastive_loss_ignores_pk_sizes():
    config = apply_overrides(get_config("tiny"), ["num_steps=1e3", "batch_pairs=2_000.0"])
    assert (config.num_steps, config.batch_pairs) == (1000, 2000)
    contrastive = apply_overrides(get_config("tiny"), ["loss=contrastive", "pk_images=1"])  # P x K batches unused
    assert contrastive.pk_images == 1


def test_every_preset_is_valid():
    from lookalike.model.config import preset_names, validate_config

    for name in preset_names():
        validate_config(get_config(name))


def test_a_resnet_too_small_for_its_stem_is_refused_with_the_other_config_errors():
    with pytest.raises(ValueError, match="image_size=2: must be at least 4"):
        apply_overrides(get_config("tiny"), ["architecture=resnet", "image_size=2"])
    assert apply_overrides(get_config("tiny"), ["conv_widths=16,"]).conv_widths == (16,)  # one trailing comma
