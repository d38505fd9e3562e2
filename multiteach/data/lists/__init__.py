"""Tile and slide lists (a bottom data floor: names of files, never their pixels beyond one tile's decode).

- ``paths``: ``PathTable`` (one buffer for millions of paths), folder walks, text/CSV/Parquet list files.
- ``images``: finding tile images (folders, path lists, class sub-folders) and decoding one as RGB.
- ``slide_list``: the slides of a run (``SlideTable``) from folders, ``.txt``/``.csv`` lists or files.
"""
