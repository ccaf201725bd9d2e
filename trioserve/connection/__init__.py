"""One accepted connection (layer 4): listeners, the edge before HTTP (PROXY header, TLS), the byte
stream, HTTP/1.1, WebSocket, the ASGI request cycle.
"""
