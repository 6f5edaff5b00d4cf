"""meshlet.proxy"""
