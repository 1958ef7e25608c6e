"""`saxutil`, the command-line tool of the sax client (entry point `sax.cli.main:main`)."""
