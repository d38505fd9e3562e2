"""multiteach: distil pathology foundation models into small, fast, robust students."""

import multiteach_tvshim

multiteach_tvshim.apply()  # before anything imports timm/open_clip/transformers

__version__ = "0.1.0"
