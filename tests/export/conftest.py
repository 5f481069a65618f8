import pytest

# beside this file; pytest puts this folder on sys.path
from tiny_adapter import build_tiny_adapter, codetune_cache  # noqa: F401 (codetune_cache is a fixture)


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory):  # after the autouse codetune_cache
    return build_tiny_adapter(tmp_path_factory.mktemp("run") / "adapter", method="lora")


@pytest.fixture(scope="session")
def full_adapter(tmp_path_factory):
    return build_tiny_adapter(tmp_path_factory.mktemp("run-full") / "adapter", method="full")
