"""A synthetic visual-question world and the small LLaVA trained on it (demo and eval only;
the library does not import this package)."""
