"""meshlet.mtls"""
