"""meshlet: a traffic-shaping sidecar and service-mesh policy engine."""

__version__ = "0.1.0"
