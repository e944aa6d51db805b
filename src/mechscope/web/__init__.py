"""The local web app over a feature database (``mechscope serve``): see :mod:`mechscope.web.app` and docs/web.md."""

from mechscope.web.app import create_app
from mechscope.web.live import NoModelError, WebInputError
from mechscope.web.security import WebSecurityError

__all__ = ["NoModelError", "WebInputError", "WebSecurityError", "create_app"]
