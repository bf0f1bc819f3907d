"""What CrypTen lacks: launcher, disclosure, range-safe nonlinearities, attention, ring matmul."""
