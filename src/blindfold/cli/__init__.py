"""The `blindfold` command line."""
