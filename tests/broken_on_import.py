"""A module that raises as it is imported (a stored task names it): recovery must go on."""

raise RuntimeError("configuration missing at import")
