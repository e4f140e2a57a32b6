"""Settings of a minimal Django project whose Celery results go to perkey://.

The Redis server is ``$PERKEY_EXAMPLE_REDIS`` (host:port, default 127.0.0.1:6379): the
broker on database 1, the results on database 0.
"""

import os

SERVER = os.environ.get("PERKEY_EXAMPLE_REDIS", "127.0.0.1:6379")

SECRET_KEY = "example-only-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["demo"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "proj.urls"
DATABASES: dict[str, dict[str, str]] = {}  # nothing here needs one
USE_TZ = True
TIME_ZONE = "UTC"

# -- Celery: every setting is Celery's name in upper case, under CELERY_ ------------------

CELERY_BROKER_URL = f"redis://{SERVER}/1"
CELERY_RESULT_BACKEND = f"perkey://{SERVER}/0"  # the one line that concerns perkey
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_TRACK_STARTED = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# The backend's own settings take the same namespace: perkey_sweep_ttl is written
# CELERY_PERKEY_SWEEP_TTL here (a bare PERKEY_SWEEP_TTL would be refused at start).
CELERY_PERKEY_SWEEP_TTL = "6h"  # the TTL the sweep gives keys that have none

# The sweep. With result_expires set, celery beat already runs it daily at 04:00 (as
# Celery's own celery.backend_cleanup) with no configuration at all; this entry runs it
# hourly instead, with options. Start beat with: celery -A proj beat
CELERY_BEAT_SCHEDULE = {
    "perkey-sweep": {
        "task": "celery_perkey_backend.sweep",
        "schedule": 3600.0,
        "kwargs": {"max_age": "1d", "delete": False},
    },
}
