"""`python -m sclatent ...` runs the command line."""

from .cli import main

main(prog_name="sclatent")
