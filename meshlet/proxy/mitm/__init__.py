"""The mitmproxy engine: mitmproxy's proxy core with meshlet's addons; user addons run here."""
