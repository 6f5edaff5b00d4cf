"""meshlet.ebpf"""
