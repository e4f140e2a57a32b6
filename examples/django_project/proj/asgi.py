"""The ASGI entry point: under an ASGI server, the async view waits on the event loop."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

application = get_asgi_application()
