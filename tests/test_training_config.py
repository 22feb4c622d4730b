"""training/config.py: the presets, the settings given over them, and the settings refused."""

import dataclasses
from pathlib import Path

import pytest

from training.config import FINE_TUNE, RUN_SETTINGS, SCRATCH, ConfigError, TrainConfig


def test_the_defaults_are_a_run_from_scratch_and_init_takes_the_fine_tune_preset():
    scratch, fine = TrainConfig.from_settings(), TrainConfig.from_settings(init=Path("m.pth"))
    assert scratch == TrainConfig()
    assert {name: getattr(scratch, name) for name in SCRATCH} == SCRATCH
    assert {name: getattr(fine, name) for name in FINE_TUNE} == FINE_TUNE
    # A setting given wins over the preset; None is a setting not given.
    given = TrainConfig.from_settings(init=Path("m.pth"), lr=0.01, epochs=None, freeze_bn=False)
    assert given.lr == 0.01 and given.epochs == FINE_TUNE["epochs"] and not given.freeze_bn


def test_mnist_alone_has_no_trajectory_epochs_and_asking_for_some_is_refused():
    assert TrainConfig.from_settings(sources=("mnist",)).trajectory_epochs == 0
    assert TrainConfig.from_settings(sources=("mnist",), trajectory_epochs=0).trajectory_epochs == 0
    with pytest.raises(ConfigError, match="--trajectory-epochs needs strokes"):
        TrainConfig.from_settings(sources=("mnist",), trajectory_epochs=3)
    assert TrainConfig.from_settings(sources=("feedback",)).trajectory_epochs == 40


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"epochs": 0}, "--epochs, --batch-size and --keep must be >= 1 and --lr > 0"),
        ({"lr": 0}, "--epochs, --batch-size and --keep must be >= 1 and --lr > 0"),
        ({"limit": 0}, "--limit must be >= 1"),
        ({"epoch_size": 0}, "--epoch-size must be >= 1"),
        ({"pen_share": 1}, "--pen-share must be between 0 and 1 (exclusive), --pen-views >= 1"),
        ({"feedback_views": 0}, "--feedback-share must be between 0 and 1 (exclusive)"),
        ({"trajectory_epochs": -1}, "--trajectory-epochs must be >= 0"),
        ({"members": 17}, "--members must be between 1 and 16"),
        ({"distill": 0.5}, "--distill must be >= 0, and needs --init"),
    ],
)
def test_settings_that_cannot_run_are_refused_naming_the_flag(settings, message):
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_settings(**settings)
    assert str(refused.value).startswith(message)
    with pytest.raises(ConfigError):
        dataclasses.replace(TrainConfig(), **settings)


def test_a_checkpoints_settings_are_plain_and_only_those_a_resume_must_share():
    config = TrainConfig(init=Path("models/model.pth"), members=2)
    settings = config.run_settings()
    assert list(settings) == list(RUN_SETTINGS)
    assert settings["sources"] == ["mnist", "pen"] and settings["init"] == "models/model.pth"
    assert settings["held_out_writers"] == [3, 8, 14, 19, 25, 30] and settings["members"] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
