"""Micro-benchmarks (``python -m disttrain.bench.<name>``): ``codec`` times the GTC encode/decode codec."""
