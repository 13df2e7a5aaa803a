"""Side-by-side benchmarks behind `kiln bench` (Kiln vs the reference each names, one run)."""
