"""A FastAPI app with a node and no logging set-up of its own, for the uvicorn logging
recipe's test (tests/test_logging_recipe.py): only uvicorn's ``--log-config`` can make the
``handoff`` logger's lines show."""

from __future__ import annotations

from fastapi import FastAPI

from handoff import Node

node = Node()  # configured by HANDOFF_* variables
node.track("sessions", {"s1": "alice", "s2": "bob"})
app = FastAPI(lifespan=node.lifespan)
