"""meshlet.policy"""
