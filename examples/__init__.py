"""Examples of warm-handoff in real services (not part of the installed package)."""
