"""`python -m blindfold` is the `blindfold` command."""

from blindfold.cli.main import entry

entry()
