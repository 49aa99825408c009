"""Command-line faces on gie_core: gie-edit (and the others as they land)."""
