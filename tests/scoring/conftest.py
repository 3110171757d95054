import pytest


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """The folder of a tiny random-weight CLIP (conjure.models.tiny_clip), built once per test session."""
    from conjure.models.tiny_clip import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
