"""GitLab helpers for the pipeline (python-gitlab): CI/CD variables, pipeline runs, CI lint.

``python -m ci.variables``, ``python -m ci.pipeline``, ``python -m ci.lint``. The variables every
job needs are derived from the config model (:mod:`ci.requirements`), never listed by hand.
"""
