"""Safe Delta, SWAT-style warm-up and safety evaluation: not started."""
