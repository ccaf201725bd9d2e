"""Sans-IO protocol code (layer 2): parsers, message translation, scope building, proxy headers,
PROXY protocol. Never trio, never sockets.
"""
