"""`python -m glmgguf` runs the command line."""

from glmgguf.cli import main

main()
