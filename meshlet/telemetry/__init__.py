"""meshlet.telemetry"""
