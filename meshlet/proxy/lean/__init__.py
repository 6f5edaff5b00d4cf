"""The lean engine: meshlet's own HTTP/1.1 data plane on uvloop + httptools (llhttp)."""
