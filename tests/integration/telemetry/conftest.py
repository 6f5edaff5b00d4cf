import sys
from pathlib import Path

import pytest

# The sidecar and mTLS tests' helpers (tests/integration/conftest.py adds the sidecar ones).
sys.path.insert(0, str(Path(__file__).parents[1] / "mtls"))

from mesh_support import FRONTEND, RATINGS, REVIEWS, make_mesh


@pytest.fixture(autouse=True, scope="module")
def each_engine(engine: str) -> str:
    """Every test here runs on the engines it names (tests/integration/conftest.py)."""
    return engine


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """Identity dirs: a (frontend), b (reviews), ratings, frontend (a raw client), impostor (another CA)."""
    mesh = make_mesh(tmp_path_factory.mktemp("mesh"))
    for name, spiffe_id in (("a", FRONTEND), ("b", REVIEWS), ("ratings", RATINGS), ("frontend", FRONTEND)):
        mesh.identity(name, spiffe_id)
    mesh.identity("impostor", FRONTEND, ca=mesh.other_ca)
    return mesh
