#!/opt/venv/bin/python
"""Container health check: exit 0 when the URL answers 2xx within 4 s, 1 otherwise.

``{NAME}`` in the URL is replaced by the environment variable NAME (Docker's exec-form
HEALTHCHECK does not expand variables, and the images have no curl).
"""

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: churn-healthcheck URL\n")
        return 2
    url = argv[1].format_map(os.environ)
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if 200 <= response.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"{url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
