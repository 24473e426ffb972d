"""gRPC server, client stubs, client library and command line: not built yet (its own issue)."""
