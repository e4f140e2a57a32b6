"""The entry of figure 11's waiting process: ``python -m benchmarks.waiters [--gevent] ...``.

With ``--gevent`` the process is monkey-patched before anything else is imported (socket,
threading, redis, celery), as a gevent application is; so this module imports nothing
but :mod:`sys` before it, then hands over to :func:`.many.child_main`.
"""

import sys


def main() -> int:
    argv = sys.argv[1:]
    if "--gevent" in argv:
        from gevent import monkey

        monkey.patch_all()
    from .many import child_main

    return child_main(argv)


if __name__ == "__main__":
    sys.exit(main())
