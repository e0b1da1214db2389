"""`python -m ccserve` is the `ccserve` command (the serve command re-executes itself this way)."""
from ccserve.cli import main

main()
