"""asv benchmarks of flashtile (see attention.py and asv_bench/README.md)."""
