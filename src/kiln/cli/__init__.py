"""Command line: parse -> config -> library call; nothing else."""
