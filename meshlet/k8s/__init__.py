"""meshlet.k8s"""
