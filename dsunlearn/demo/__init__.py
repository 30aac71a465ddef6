"""The demo world: a small three-domain corpus (books, papers, code) built from registry packages (`world.py`)."""
