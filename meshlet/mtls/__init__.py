"""Mesh identity: the CA, workload certificates named by SPIFFE IDs, peer verification, TLS contexts, rotation.

Pure parts (`ca`, `verify`) take keys, certificates and times and return values; `files` and
`rotation` are the disk edges; `contexts` turns an identity into pyOpenSSL contexts. The
mitmproxy addon that uses them lives in `meshlet.proxy.mitm.mtls`.
"""
