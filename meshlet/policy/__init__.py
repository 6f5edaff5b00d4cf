"""Policy language: model, YAML loading with located errors, and validation."""

from meshlet.policy.errors import PolicyError, PolicyInvalid
from meshlet.policy.load import load_file, load_files, load_text
from meshlet.policy.model import PolicySet, QoSPolicy, TrafficPolicy

__all__ = [
    "PolicyError",
    "PolicyInvalid",
    "PolicySet",
    "QoSPolicy",
    "TrafficPolicy",
    "load_file",
    "load_files",
    "load_text",
]
