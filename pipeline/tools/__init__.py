"""Tooling outside the product: the benchmark, the GPU benchmark, the label-efficiency study;
nothing in the product imports it."""
