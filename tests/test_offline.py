"""The suite runs offline: the hub libraries see offline mode, whatever the calling environment says."""


def test_hub_libraries_are_offline():
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is True
