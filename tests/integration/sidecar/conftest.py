import pytest


@pytest.fixture(autouse=True, scope="module")
def each_engine(engine: str) -> str:
    """Every test here runs on both engines (tests/integration/conftest.py)."""
    return engine
