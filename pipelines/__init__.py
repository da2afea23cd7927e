"""Named recipes: each is a function returning the configs of a run; the Makefile calls them by name."""
