"""The shop service: caches in front of a slow catalog, kept warm across deploys.

Three kinds of in-memory state, each handed to the successor when this process drains:

- ``products``: a ``cachetools.TTLCache`` of product records, schema version 2. Version 1
  (the previous release) stored ``{"id", "name", "price"}`` with a float price; version 2
  stores ``price_cents`` and ``currency``. :func:`product_v1_to_v2` upgrades records that
  arrive from a version-1 node; :func:`product_v2_to_v1` downgrades records this node sends
  to a version-1 node (a rollback). Remaining lifetimes travel with the entries.
- ``searches``: a ``cachetools.LRUCache`` of search results; recency order survives.
- ``views``: a plain ``dict`` of view counts per product, handed off through the mapping
  adapter. When both sides hold a count the larger one is kept (``merge=max``), so a record
  delivered twice cannot inflate it; counts the successor took meanwhile can be lost.
  Exact cluster-wide counters need a counters adapter (not shipped yet), not a dict.

Every endpoint is ``async def``: tracked objects are touched only on the event loop, the
thread on which the node exports and applies handed-off chunks. (A ``def`` endpoint runs in
a worker thread and would have to hold ``node.lock`` around every access.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from cachetools import LRUCache, TTLCache
from fastapi import FastAPI, HTTPException, Path, Query, Response

from examples.service.catalog import PRODUCT_SCHEMA_VERSION, Catalog
from examples.service.settings import ShopSettings
from handoff import DownReason, Node, Peer
from handoff.metrics import prometheus_app

__all__ = ("Shop", "create_app", "product_v1_to_v2", "product_v2_to_v1")

logger = logging.getLogger("examples.service")

Product = dict[str, Any]


def product_v1_to_v2(key: int, value: Mapping[str, Any]) -> tuple[int, Product]:
    """Upgrade hook (runs on this release when a version-1 node hands off to it)."""
    return key, {
        "id": value["id"],
        "name": value["name"],
        "price_cents": round(float(value["price"]) * 100),
        "currency": "EUR",
    }


def product_v2_to_v1(key: int, value: Mapping[str, Any]) -> tuple[int, Product]:
    """Downgrade hook (runs on this release when it hands off to a version-1 node)."""
    return key, {"id": value["id"], "name": value["name"], "price": value["price_cents"] / 100}


class Shop:
    """The service's state and logic, independent of HTTP."""

    def __init__(self, settings: ShopSettings) -> None:
        self.settings = settings
        self.catalog = Catalog(settings.catalog_size, settings.backend_delay)
        self.products: TTLCache[int, Product] = TTLCache(
            maxsize=settings.cache_size, ttl=settings.cache_ttl
        )
        self.searches: LRUCache[str, list[int]] = LRUCache(maxsize=settings.search_cache_size)
        self.views: dict[int, int] = {}
        self.hits = 0
        self.misses = 0

    def track(self, node: Node) -> None:
        """Tell ``node`` what to hand off, and how to convert product records."""
        node.track("products", self.products, version=PRODUCT_SCHEMA_VERSION)
        node.track("searches", self.searches)
        node.track("views", self.views, merge=max)
        node.upgrade("products", 1)(product_v1_to_v2)
        node.downgrade("products", 2)(product_v2_to_v1)

    async def product(self, product_id: int) -> tuple[Product | None, str]:
        """The product and where it came from: ``"cache"`` or ``"backend"``."""
        cached = self.products.get(product_id)
        if cached is not None:
            self.hits += 1
            source = "cache"
            product: Product | None = cached
        else:
            self.misses += 1
            source = "backend"
            product = await self.catalog.product(product_id)
            if product is not None:
                self.products[product_id] = product
        if product is not None:
            self.views[product_id] = self.views.get(product_id, 0) + 1
        return product, source

    async def search(self, query: str) -> tuple[list[int], str]:
        """Ids of products matching ``query`` and where they came from."""
        key = query.strip().lower()
        cached = self.searches.get(key)
        if cached is not None:
            self.hits += 1
            return cached, "cache"
        self.misses += 1
        ids = await self.catalog.search(key)
        self.searches[key] = ids
        return ids, "backend"

    def stats(self) -> dict[str, Any]:
        """Cache effectiveness and sizes (expired products are purged first)."""
        self.products.expire()
        return {
            "hits": self.hits,
            "misses": self.misses,
            "backend_calls": self.catalog.calls,
            "sizes": {
                "products": len(self.products),
                "searches": len(self.searches),
                "views": len(self.views),
            },
        }

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The app's own lifespan; the node's runs around it (warm before, drain after)."""
        await self.catalog.connect()
        logger.info(
            "serving with %d products, %d searches and %d view counts in memory",
            len(self.products),
            len(self.searches),
            len(self.views),
        )
        try:
            yield
        finally:
            await self.catalog.close()
            logger.info("stopped serving; the node drains next")


def _peer_info(peer: Peer) -> dict[str, Any]:
    return {
        "name": peer.name,
        "release": peer.release,
        "state": str(peer.state),
        "address": peer.address,
    }


def node_info(node: Node) -> dict[str, Any]:
    """What ``/stats`` says about the node: identity, warmth, peers, the last drain."""
    report = node.last_drain_report
    return {
        "name": node.name,
        "cluster": node.cluster,
        "release": node.release,
        "state": str(node.state),
        "address": node.address,
        "warm": node.is_warm,
        "warm_reason": node.warm_reason,
        "peers": [_peer_info(peer) for peer in node.peers()],
        "last_drain": report.summary() if report is not None else None,
    }


def _log_membership(node: Node) -> None:
    @node.on_node_up
    def joined(peer: Peer) -> None:
        logger.info("peer %s (release %s) joined", peer.name, peer.release)

    @node.on_node_leaving
    def leaving(peer: Peer) -> None:
        logger.info("peer %s (release %s) is draining", peer.name, peer.release)

    @node.on_node_down
    def gone(peer: Peer, reason: DownReason) -> None:
        logger.info("peer %s (release %s) left: %s", peer.name, peer.release, reason)


def create_app(
    environ: Mapping[str, str] | None = None, *, settings: ShopSettings | None = None
) -> FastAPI:
    """Build the service from ``environ`` (default: the process environment).

    The node reads ``HANDOFF_*`` (and ``FLY_*`` / Kubernetes) variables, the shop
    ``SHOP_*``. Raises ``handoff.ConfigError`` or :class:`ValueError` on bad settings.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    shop = Shop(settings if settings is not None else ShopSettings.from_env(env))
    node = Node(environ=env)
    shop.track(node)
    _log_membership(node)
    app = FastAPI(title="shop (warm-handoff example)", lifespan=node.lifespan_with(shop.lifespan))
    app.state.shop = shop
    app.state.node = node
    # Prometheus scrapes the node's metrics here (a registry of this app's own).
    app.add_route("/metrics", prometheus_app(node), include_in_schema=False)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: 200 whenever the process serves HTTP at all."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(response: Response) -> dict[str, object]:
        """Readiness: 200 once the node is warm, 503 before (see ``Node.readiness``)."""
        response.status_code, body = node.readiness()
        return body

    @app.get("/products/{product_id}")
    async def product(product_id: Annotated[int, Path(ge=1)]) -> dict[str, Any]:
        """A product, from the cache if it holds it, else from the (slow) catalog."""
        found, source = await shop.product(product_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no product {product_id}")
        return {"product": found, "source": source, "views": shop.views[product_id]}

    @app.get("/search")
    async def search(q: Annotated[str, Query(min_length=1, max_length=64)]) -> dict[str, Any]:
        """Ids of products whose name contains ``q``; recent searches are cached."""
        ids, source = await shop.search(q)
        return {"query": q, "ids": ids, "source": source}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """Hits, misses, backend calls, cache sizes and the node's view of the cluster."""
        return {**shop.stats(), "node": node_info(node)}

    return app
