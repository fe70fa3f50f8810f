"""One thin module per command: its arguments and one call into the library (imported only when it runs)."""
