"""Local clusters on one machine: a DNS responder on loopback and node child processes.

Product code (``handoff simulate``) runs from here; :mod:`handoff.testing` re-exports the
same classes for users' own tests, so the product never imports the testing package
(DESIGN.md: a test helper's change never changes product behaviour).
"""
