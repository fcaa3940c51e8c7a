"""Role checks that come before a route's parameters: dependencies that refuse a key of another role
with its audited 403 ``role_not_allowed`` whatever it sent.

A router's dependencies, then a route's ``dependencies``, run before FastAPI validates the route's own
path, query and body. Checked in the route or in a service, a malformed id (or an unknown query
parameter, a body of another media type) answered another role's key 422 or 415, telling it the
route's shape, and its refusal was never audited. A body that does not parse as JSON is still answered
422 before any key is checked: FastAPI reads it before any dependency runs."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from fastapi import Depends, Request
from pydantic import TypeAdapter, ValidationError

from api.deps import AuthenticatedCaller, require_role
from core.cases import require_clinic
from core.errors import Forbidden
from core.models import Role


def role_first(*roles: Role) -> Any:
    """For ``APIRouter(dependencies=[role_first(...)])``, whose every route needs one of ``roles`` (or a
    route's first dependency): a key of another role is refused, audited as ``access.denied``
    (:func:`api.deps.require_role`), before anything else about the request is looked at."""

    async def role_allowed(caller: AuthenticatedCaller) -> None:
        require_role(caller, *roles)

    return Depends(role_allowed)


def clinic_first(action: str, **detail: str) -> Any:
    """:func:`role_first` for a clinic's case routes, whose refusal of another role's key
    :func:`core.cases.require_clinic` audits under the route's own action (``case.read``,
    ``heatmap.read``, ...: an auditor's search for a case's reads finds the refused ones too): that
    same refusal and event, before the route's parameters. The event names the case when the path's
    ``case_id`` is one, as the service's check does; a malformed id is not written to the trail.
    ``detail`` joins the event's (``format="fhir"``, as the FHIR route's other answers)."""

    async def clinic_key(request: Request, caller: AuthenticatedCaller) -> None:
        try:
            require_clinic(caller.principal, action)
        except Forbidden as exc:  # the path is read only to refuse: a clinic's own read pays nothing for it
            exc.audit = dataclasses.replace(
                exc.audit, entity_id=_case_in_path(request), detail={**exc.audit.detail, **detail}
            )
            raise

    return Depends(clinic_key)


#: the route's own reading of a path's ``case_id`` (``uuid.UUID`` itself takes more: braces, "+" and "_")
_AS_ROUTE_READS = TypeAdapter(uuid.UUID)


def _case_in_path(request: Request) -> str | None:
    """The path's ``case_id`` as the route would read it, or None (no such parameter, or one the
    route would refuse as malformed: it is not written to the trail)."""
    raw = request.path_params.get("case_id")
    if not isinstance(raw, str):
        return None
    try:
        return str(_AS_ROUTE_READS.validate_python(raw))
    except ValidationError:
        return None
