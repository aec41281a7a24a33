"""Host-side machinery of formulabeat: everything a run needs on its host, no Celery."""

import os

# GitPython refuses to import when git is missing; formulabeat reports that
# per run instead ("git not found on PATH"), so a worker keeps serving.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
