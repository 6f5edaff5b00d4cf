import sys
from pathlib import Path

# The chart's render helpers (k8s) and the sidecar, mesh and rollout harnesses are shared, not copied.
for directory in ("k8s", "sidecar", "mtls", "rollout"):
    sys.path.insert(0, str(Path(__file__).parents[1] / directory))
