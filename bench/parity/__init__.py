"""Numerical parity of the studio's trainers with the methods' official implementations (bench/parity/README.md)."""
