"""Development and test tooling, shipped with the package so ``./scripts/local-up`` works from a
fresh machine: namespace test hosts (``testhosts``: a network namespace with its own sshd, and
dockerd when asked) and the local environment built on one (``localenv``). Nothing in the product
imports from here."""
