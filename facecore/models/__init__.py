"""Model families, one per file. Constructor arguments are a frozen config dataclass."""
