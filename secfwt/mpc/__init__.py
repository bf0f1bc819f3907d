"""What CrypTen lacks: launcher, transports (gloo, TLS gRPC), disclosure, range-safe
nonlinearities, ring matmul."""
