"""minicnn command line (installed as the minicnn.cli package)."""
