"""An order pipeline: orders -> validated invoices -> running totals.

    cd samples/orders && streamkit run app:app

``orders`` is a source that emits an order every half second; one in seven is
invalid (a negative quantity, or a payload of the wrong shape). ``invoice`` validates
and prices each order; invalid ones go to the dead-letter destination
``orders.billing.dlq`` (``error.orders.billing`` on Kafka) with the reason in
``x-exception-message``. ``totals`` logs the running revenue per customer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field

from streamkit import Message, StreamApp

app = StreamApp("orders")
log = logging.getLogger("orders")

PRICES = {"apple": 0.5, "pear": 0.75, "fig": 1.25}


class Order(BaseModel):
    id: int
    customer: str
    item: str
    quantity: int


class Invoice(BaseModel):
    order_id: int
    customer: str
    amount: float = Field(ge=0)


class InvalidOrder(ValueError):
    """An order that no retry can fix."""


@app.producer
async def orders() -> AsyncIterator[Any]:
    customers = itertools.cycle(["ada", "grace", "linus"])
    items = itertools.cycle(PRICES)
    for n in itertools.count(1):
        if n % 7 == 0:
            yield {"id": n, "customer": next(customers)}  # wrong shape: no item
        else:
            quantity = -1 if n % 5 == 0 else n % 4 + 1
            order = Order(
                id=n, customer=next(customers), item=next(items), quantity=quantity
            )
            yield Message(order, key=order.customer)
        await asyncio.sleep(0.5)


@app.processor
def invoice(order: Order) -> Message[Invoice]:
    if order.quantity <= 0:
        raise InvalidOrder(f"order {order.id}: quantity must be positive")
    amount = PRICES[order.item] * order.quantity
    return Message(
        Invoice(order_id=order.id, customer=order.customer, amount=amount),
        key=order.customer,
    )


_totals: dict[str, float] = defaultdict(float)


@app.consumer
def totals(inv: Invoice) -> None:
    _totals[inv.customer] += inv.amount
    log.info(
        "invoice %d: %s +%.2f (total %.2f)",
        inv.order_id,
        inv.customer,
        inv.amount,
        _totals[inv.customer],
    )
