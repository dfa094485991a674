"""Wire protocol: the only package that knows about sockets and frames."""
