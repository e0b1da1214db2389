"""`python -m ccserve.router relay | router | issuer` (the same subcommands as `ccserve relay | ...`)."""
from ccserve.router.commands import main

main()
