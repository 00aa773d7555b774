"""One module per chapter: the trusted verdict of each hidden check (reference, named mistakes)."""
