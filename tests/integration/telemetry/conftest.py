import sys
from pathlib import Path

import pytest

# The chart's render helpers (k8s) and the sidecar, mesh and rollout harnesses are shared, not copied.
for directory in ("k8s", "sidecar", "mtls", "rollout"):
    sys.path.insert(0, str(Path(__file__).parents[1] / directory))

from mesh_support import FRONTEND, RATINGS, REVIEWS, make_mesh  # noqa: E402


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    """Identity dirs: a (frontend), b (reviews), ratings, frontend (a raw client), impostor (another CA)."""
    mesh = make_mesh(tmp_path_factory.mktemp("mesh"))
    for name, spiffe_id in (("a", FRONTEND), ("b", REVIEWS), ("ratings", RATINGS), ("frontend", FRONTEND)):
        mesh.identity(name, spiffe_id)
    mesh.identity("impostor", FRONTEND, ca=mesh.other_ca)
    return mesh
