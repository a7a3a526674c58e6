"""segplan tests (a regular package: a site-packages 'tests' package, e.g. miseval's, must not shadow it)."""
