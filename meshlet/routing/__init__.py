"""meshlet.routing"""
