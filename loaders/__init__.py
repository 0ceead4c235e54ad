"""Data loaders: thin entry points over `cnnsql.loader` (the same code as `cnnsql load`)."""
