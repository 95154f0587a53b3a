"""Reference implementations we compare against (TRL), for parity tests and benchmarks."""
