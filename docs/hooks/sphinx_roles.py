"""A griffe extension for the API reference: the docstrings' reST roles read as code.

revnet's docstrings name other objects the way Python's own docs do (``:class:`Plan```,
``:func:`revnet.set_exact```); mkdocstrings renders Markdown, where such a role would show
literally. This turns each into inline code (``Plan``) before the page is rendered.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`target``` as ``target`` in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
