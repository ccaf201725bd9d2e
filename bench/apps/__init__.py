"""Applications served during the benchmarks (bench-only, not part of trioserve)."""
