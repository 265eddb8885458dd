"""CPU speed code applied at the edge: prepacked oneDNN weights, Winograd convolutions, heap tuning."""
