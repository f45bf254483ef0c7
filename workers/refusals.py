"""A request a service will not carry out, with how an HTTP answer names it: the services
raise it, the API turns it into a problem document, the CLI into a one-line error."""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
